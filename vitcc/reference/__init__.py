"""The reference semantics: the masked model the compact one must equal, and verify, which compares them."""
