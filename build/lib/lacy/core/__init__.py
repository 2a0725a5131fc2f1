"""The small core every stage stands on: config, paths, storage, stage records, tracking, console, compute."""
