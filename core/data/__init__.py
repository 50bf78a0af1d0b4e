"""The data stream: the :class:`~layerscope.data.source.DataSource` base class of data-source
plugins, sample order, batches and shards (``source``), and labels as classes (``labels``). May import
:mod:`layerscope.util` only.
"""
