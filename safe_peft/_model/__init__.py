"""Stage 2, viewing the model: the keys and shapes it expects from an adapter, the defaults peft fills in, its
sharding."""
