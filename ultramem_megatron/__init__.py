"""ultramem-megatron: pretraining language models with UltraMem layers on megatron-core."""
