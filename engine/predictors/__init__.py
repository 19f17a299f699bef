"""Activation predictors trained for models that ship none (`sparse-serve train-predictors`)."""
