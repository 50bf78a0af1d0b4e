"""Built-in reporters: ``csv`` (``records_csv``), ``parquet`` (``records_parquet``), ``plots`` (``plots``, with the
default figure estimators without their own use) and ``html`` (``html_report``, with ``pivot`` tables); the
trackers ``tensorboard``, ``mlflow`` and ``wandb`` (``tensorboard_tracker``, ``mlflow_tracker``, ``wandb_tracker``,
sharing ``trackers``). Imports layerscope's public API and helpers only.
"""
