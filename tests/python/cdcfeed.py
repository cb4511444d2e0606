"""Change events delivered as a change feed delivers them, for the CDC tests: split into one
file per run, shuffled within small windows, a few of each run's events held back to the
next run (late), and some earlier events delivered again (replayed)."""


def batches(events, rng, runs=3, hold=4, window=6, replay=10):
    """Yield the events of each run in turn; every event is delivered by the last run."""
    size = -(-len(events) // runs)
    chunks = [events[i:i + size] for i in range(0, len(events), size)]
    late, seen = [], []
    for n, chunk in enumerate(chunks):
        batch = late + list(chunk)
        late = [batch.pop(rng.randrange(len(batch))) for _ in range(hold)] if n < len(chunks) - 1 else []
        for start in range(0, len(batch), window):
            part = batch[start:start + window]
            rng.shuffle(part)
            batch[start:start + window] = part
        batch += rng.sample(seen, min(replay, len(seen)))
        seen += chunk
        yield batch
