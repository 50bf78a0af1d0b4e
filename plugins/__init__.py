"""Built-in estimators, data sources and reporters, each registered like a third-party plugin."""
