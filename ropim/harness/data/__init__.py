"""Data, split by job: ``datasets`` (what images there are), ``transforms`` (the views a
model sees), ``views`` (seeded per run seed, epoch and image), ``batching`` (which images make
each step)."""
