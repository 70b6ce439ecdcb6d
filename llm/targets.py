"""What data and objectives agree on about targets."""

IGNORE = -1  # target id that contributes no loss
