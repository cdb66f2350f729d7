"""tickcast's streaming daemon: Kafka ticks in, batched GRU predictions out."""
