#!/usr/bin/env python3
"""Writes the example's raw order files (data/orders_YYYY-MM-DD.csv), deterministically.

Seven days of orders with what real exports have: customer emails (PII), exact duplicate
rows, late updates (an order re-sent on a later day with a newer updated_at and a new
status or amount), and two malformed rows (a short row, and an amount that is not a
number). Run it again and you get the same bytes.
"""
import csv
import datetime as dt
import pathlib
import random

rng = random.Random(20240101)
out = pathlib.Path(__file__).parent / "data"
out.mkdir(exist_ok=True)
countries = ["DE", "FR", "NL", "ES", "IT", "PL", "SE"]
names = ["ana", "bo", "chen", "dara", "eli", "femi", "gus", "hana", "ivo", "jo", "kai", "lea"]
header = ["order_id", "customer_email", "country", "amount", "status", "ordered_at", "updated_at"]
start = dt.datetime(2024, 1, 1)
next_id = 100000
history = []  # orders that may get a late update

for day in range(7):
    date = start + dt.timedelta(days=day)
    rows = []
    for _ in range(rng.randint(380, 420)):
        next_id += 1
        at = date + dt.timedelta(seconds=rng.randint(0, 86399))
        email = f"{rng.choice(names)}.{rng.randint(1, 999)}@example.{rng.choice(['com', 'org', 'io'])}"
        row = [next_id, email, rng.choice(countries), f"{rng.randint(500, 50000) / 100:.2f}", "placed", at.isoformat(), at.isoformat()]
        rows.append(row)
        history.append(row)
        if rng.random() < 0.03:  # the export sends some rows twice
            rows.append(list(row))
    # late updates to orders from earlier days
    for old in rng.sample(history[: max(1, len(history) - len(rows))], k=min(25, len(history))) if day > 0 else []:
        upd = list(old)
        upd[4] = rng.choice(["shipped", "cancelled", "refunded"])
        if upd[4] == "shipped" and rng.random() < 0.3:
            upd[3] = f"{float(upd[3]) + 5:.2f}"  # shipping added
        upd[6] = (date + dt.timedelta(seconds=rng.randint(0, 86399))).isoformat()
        rows.append(upd)
    rng.shuffle(rows)
    path = out / f"orders_{date:%Y-%m-%d}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, r in enumerate(rows):
            if day == 2 and i == 17:
                w.writerow(r[:5])  # a short row: 5 fields instead of 7
                continue
            if day == 4 and i == 42:
                r = list(r)
                r[3] = "12.3.4"  # not a number
            if day == 1 and i in (5, 6, 7, 8) and r[4] == "placed":
                r = list(r)
                r[2] = ""  # no country: a warning
            if day == 5 and i in (10, 20, 30) and r[4] == "placed":
                r = list(r)
                r[3] = f"-{r[3]}"  # a negative amount: quarantined
            w.writerow(r)
print(f"wrote 7 files to {out}")
