"""ultramem-megatron: pretraining language models with UltraMem layers on megatron-core."""

import warnings

# megatron-core warns at import that Transformer Engine / apex are absent; here they are optional
# fast paths (CPU runs never have them), so the warning is noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
# Raised inside megatron-core for its own defaults and its own torch calls; nothing a user can act on.
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`")
