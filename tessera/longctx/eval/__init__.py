"""A RULER-style evaluation of the long-context modes: tasks built into two public-domain haystacks
(tasks.py, haystacks.py), a development and a held-out split fixed by seed, and exact scoring
(scoring.py). `tessera bench ruler` runs it (tessera/bench/ruler.py)."""
