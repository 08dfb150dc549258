"""A SpamAssassin-compatible rules engine.

``ruleset.load(dirs)`` reads rule files (``header``, ``body``, ``rawbody``,
``full``, ``uri``, ``mimeheader``, ``meta``, ``score``, ``describe``,
``tflags``, ``ifplugin``/``if``/``endif``, ``include``, ReplaceTags);
``engine.Engine`` runs them against a ``message.MessageView``.  Perl regexes
are translated by ``perlre``; ``evals`` holds the native ``eval:`` tests.
"""
