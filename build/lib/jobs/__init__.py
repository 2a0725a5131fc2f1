"""Ray shells: each distributes one library stage (`python -m jobs.<name> --config FILE`)."""
