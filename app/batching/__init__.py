"""Batching: admission at the door, fair queues, the batcher on its lanes, warm-up and the batch
limit."""
