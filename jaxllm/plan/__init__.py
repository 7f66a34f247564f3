"""Plan before you rent: per-device memory and step time for a target, by model and compiler."""
