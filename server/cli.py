"""`sparse-serve` (also `python -m sparse_serve.server`): serve, convert, calibrate, train-predictors.

`serve` maps its flags onto the one config tree (`EngineConfig.load(*--config, overrides=...)`),
starts uvicorn at once (so /health answers 503 while the model loads) and loads the model in a
background thread. `convert`, `calibrate` and `train-predictors` hand their arguments to the engine's tools,
imported only when used.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sparse_serve.engine.core.config import CONFIG_DIR, MODEL_DTYPES, QUANTIZATIONS, EngineConfig
from sparse_serve.server.tools.parsers import PARSERS as TOOL_CALL_PARSERS

logger = logging.getLogger("sparse_serve")

API_KEYS_ENV = "SPARSE_SERVE_API_KEYS"   # comma-separated; keeps keys out of `ps` output
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MB', '2g' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 2GiB or 1073741824)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_rate(text: str) -> float:
    """A fraction of engine steps, 0 (off) to 1 (every step)."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-serve",
                                     description="OpenAI-compatible server for activation-sparse LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,convert,calibrate,train-predictors}")
    serve = sub.add_parser("serve", help="run the HTTP server")
    sub.add_parser("convert", help="convert a GGUF checkpoint (see `sparse-serve convert --help`)",
                   add_help=False)
    sub.add_parser("calibrate", help="calibrate per-layer sparsity thresholds "
                   "(see `sparse-serve calibrate --help`)", add_help=False)
    sub.add_parser("train-predictors", help="train activation predictors for a model without them "
                   "(see `sparse-serve train-predictors --help`)", add_help=False)

    model = serve.add_argument_group("model")
    model.add_argument("--model", help="local model folder (default: the embedded default model)")
    model.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="YAML config file; repeat to layer several (later wins)")
    model.add_argument("--served-model-name", help="the name clients send as `model`")
    model.add_argument("--chat-template", metavar="FILE", help="Jinja chat template overriding the tokenizer's")
    model.add_argument("--sparsity", metavar="FILE", help="calibrated sparsity thresholds (JSON)")
    model.add_argument("--predictor-threshold", type=float, metavar="FLOAT",
                       help="a neuron runs iff its predictor logit exceeds this (default 0.0); higher "
                            "skips more neurons (faster, lower recall)")
    model.add_argument("--dtype", choices=MODEL_DTYPES)
    model.add_argument("--device", help="auto, cpu or cuda[:N]")
    model.add_argument("--quantization", choices=[q for q in QUANTIZATIONS if q],
                       help="int8 weights for the attention projections, lm_head, the FFN rows and the "
                            "predictors, CPU only: int8 reads activations on a 14-bit grid (near-lossless), "
                            "w8a8 on an 8-bit grid (faster with many users, costs some perplexity); "
                            "int4 and w4a8 are the same with 4-bit rows (groups of 32) for the attention "
                            "projections and the FFN, lm_head staying int8 (fewer bytes per token, more "
                            "perplexity; docs/benchmarks/quantization.md)")
    model.add_argument("--max-model-len", type=int, help="context window (default: the model's)")

    engine = serve.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, help="sequences per batch")
    engine.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step")
    engine.add_argument("--kv-cache-bytes", type=parse_bytes, help="KV cache budget on CPU, e.g. 2GiB")
    engine.add_argument("--block-size", type=int, help="tokens per KV block")
    engine.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="run decode steps eagerly (no CUDA graphs; GPU only)")
    engine.add_argument("--predictor-shadow-rate", type=parse_rate, metavar="FLOAT",
                        help="fraction of steps whose predictor is checked against the exact activation "
                             "(exported as predictor recall/precision; default 0 = off, e.g. 0.01)")

    http = serve.add_argument_group("http")
    http.add_argument("--host", help="bind address (default 127.0.0.1)")
    http.add_argument("--port", type=int, help="port (default 8000)")
    http.add_argument("--api-key", action="append", metavar="KEY",
                      help=f"require this bearer key; repeat for several (or set {API_KEYS_ENV})")
    http.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                      help="turn CORS on for these origins ('*' for any)")
    http.add_argument("--log-level", choices=LOG_LEVELS)
    http.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS),
                      help="how tool_choice 'auto' reads the model's calls (default hermes: <tool_call> JSON)")
    return parser


DEFAULT_MODEL_CONFIG = CONFIG_DIR / "smollm2.yaml"


def config_overrides(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Flags -> dotted config keys; flags not given are None and leave the YAML values alone."""
    environ = os.environ if environ is None else environ
    api_keys = args.api_key
    if not api_keys and environ.get(API_KEYS_ENV):
        api_keys = [k.strip() for k in environ[API_KEYS_ENV].split(",") if k.strip()]
    return {
        "model.path": args.model,
        "model.served_model_name": args.served_model_name,
        "model.chat_template": args.chat_template,
        "model.sparsity_file": args.sparsity,
        "model.predictor_threshold": args.predictor_threshold,
        "model.dtype": args.dtype,
        "model.device": args.device,
        "model.quantization": args.quantization,
        "model.max_model_len": args.max_model_len,
        "scheduler.max_num_seqs": args.max_num_seqs,
        "scheduler.max_num_batched_tokens": args.max_num_batched_tokens,
        "cache.kv_cache_bytes": args.kv_cache_bytes,
        "cache.block_size": args.block_size,
        "cache.enable_prefix_caching": False if args.no_prefix_caching else None,
        "model.enforce_eager": True if args.enforce_eager else None,
        "server.predictor_shadow_rate": args.predictor_shadow_rate,
        "server.host": args.host,
        "server.port": args.port,
        "server.api_keys": api_keys,
        "server.allowed_origins": args.allowed_origins,
        "server.log_level": args.log_level,
        "server.tool_call_parser": args.tool_call_parser,
    }


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_server(config: EngineConfig, engine_factory: Callable[[EngineConfig], Any] | None = None):
    """The uvicorn server for `serve`, its app loading the model in the background.
    Its `exit_code` turns 1 (and the server stops) if the model fails to load."""
    from sparse_serve.server.app import build_app
    from sparse_serve.server.http_server import make_server
    from sparse_serve.server.loader import load_engine

    factory = engine_factory or load_engine
    server = None

    def on_fatal(message: str) -> None:
        logger.error("stopping: %s", message)
        server.exit_code = 1
        server.should_exit = True

    app = build_app(None, config, engine_loader=lambda: factory(config), on_fatal=on_fatal)
    server = make_server(app, config)
    return server


def serve(config: EngineConfig, engine_factory: Callable[[EngineConfig], Any] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code (1 if the model failed to load)."""
    server = create_server(config, engine_factory)
    logger.info("listening on http://%s:%d (model loads in the background; /health is 503 until ready)",
                config.server.host, config.server.port)
    server.run()
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # NOTE: convert/calibrate own their flags; hand them everything after the subcommand.
    if argv and argv[0] == "convert":
        from sparse_serve.engine.checkpoints.convert_gguf import main_convert

        return main_convert(argv[1:]) or 0
    if argv and argv[0] == "calibrate":
        from sparse_serve.engine.calibration.calibrate import main_calibrate

        return main_calibrate(argv[1:]) or 0
    if argv and argv[0] == "train-predictors":
        from sparse_serve.engine.predictors.cli import main_train_predictors

        return main_train_predictors(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = EngineConfig.load(*args.config, overrides=config_overrides(args))
        if config.model.path is None and DEFAULT_MODEL_CONFIG.is_file():
            # NOTE: the embedded default model comes with its own config (calibrated sparsity),
            # layered under the user's files and flags so those still win.
            config = EngineConfig.load(DEFAULT_MODEL_CONFIG, *args.config, overrides=config_overrides(args))
    except (OSError, ValueError) as exc:
        parser.error(str(exc))  # exits with status 2, as argparse does for bad flags
    configure_logging(config.server.log_level)
    logger.info("config: %s", _redacted(config.to_dict()))
    return serve(config)


def _redacted(tree: dict[str, Any]) -> dict[str, Any]:
    server = dict(tree.get("server", {}))
    if server.get("api_keys"):
        server["api_keys"] = [f"<{len(server['api_keys'])} keys>"]
    return {**tree, "server": server}
