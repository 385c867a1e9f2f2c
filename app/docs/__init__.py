"""Document collections: files -> chunks -> a SQLite FTS5 index -> passages quoted in a prompt.

Imports neither torch nor textual, so `llamadesk docs ...` starts at once.
"""
from .index import CollectionInfo, DocsIndex, SyncSummary, check_name
from .retrieve import NO_SOURCE, Passage, grounded_prompt, search, sources_block

__all__ = ["CollectionInfo", "DocsIndex", "NO_SOURCE", "Passage", "SyncSummary", "check_name", "grounded_prompt",
           "search", "sources_block"]
