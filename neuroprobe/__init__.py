"""neuroprobe: record, find and lesion concept cells in neural networks."""
