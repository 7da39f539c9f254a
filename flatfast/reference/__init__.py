"""Reference implementations: naive, readable, float64, no speed tricks. They are the oracles every native
backend is tested against, and the fallback when no native backend can run."""
