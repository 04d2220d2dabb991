"""The invariant: model contract, padded-batch run, ragged batcher."""
