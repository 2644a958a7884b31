"""The ROPIM method: the count-sketch projection and the masking method built on it."""
