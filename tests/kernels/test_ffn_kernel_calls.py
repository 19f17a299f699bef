"""bench/ffn_kernel_calls.py (what gpu_check.sh profiles) runs, on a small layer."""

from sparse_serve.bench import ffn_kernel_calls


def test_profiled_calls_run_and_give_finite_output(capsys):
    ffn_kernel_calls.main(["--batch", "2", "--calls", "2", "--hidden", "48", "--intermediate",
                           "80", "--sparsity", "0.5"])
    out = capsys.readouterr().out
    assert "2 rounds of 2 calls, batch 2, 48 x 80, 50% sparsity: out (2, 48) finite=True" in out
