"""How a user's model is read: its batches as users have them, the parameters measured (``params=``), the mode
and backends every pass runs in, and what the passes share (sums over ranks, finite losses). Internal: the
public names are ``flatfast.NAME``."""
