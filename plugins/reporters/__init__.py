"""Built-in reporters: ``csv`` (``records_csv``), ``plots`` (``plots``, with the default figure
estimators without their own use) and ``html`` (``html_report``, with ``pivot`` tables). Imports
layerscope's public API and helpers only.
"""
