"""Jobs: one complete series through routing, assembly, inference and encoding.

The runner (:mod:`.runner`) claims a complete series, routes it to models
(:mod:`.routing`), assembles its volume, asks each model's backend for labels, encodes the
results with every registered encoder, writes them durably and queues them in the outbox,
in the transaction that ends the job.
"""
