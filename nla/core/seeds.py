"""Offsets from the run's seed for the RNG streams that must not share it with training.

A control or a check drawn from `seed` itself would repeat training's draws (the same permutation,
the same samples); each gets `seed + OFFSET`. The values are fixed: changing one changes measured
numbers.
"""

HELD_OUT_SAMPLING = 1  # RL's held-out check: the explanations it samples for val vectors
SHUFFLED_TARGETS = 1  # the AR's shuffled-target control: which row's target each row learns
SHUFFLED_VECTORS = 7  # train-av's shuffled-vector control: which val vector each response is scored with
CONTROL_PAIRING = 1  # eval's controls: which other row's explanation or vector a row is paired with
CLAIM_CHANCE = 11  # claim checks' chance level: which other row's context a row's claims are checked against
