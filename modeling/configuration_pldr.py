"""Configuration of PLDR-LLM (Large Language Model from Power Law Decoder Representations).

The config keys are those of the published PLDR-LLM checkpoints (``model_type: "pldrllm"``), so a published
``config.json`` loads as it is. Defaults are the PLDR-LLM-v51-110M models of arXiv 2502.13502.
"""

from transformers import PreTrainedConfig

CUSTOM_G_TYPES = (None, "identity", "random", "external")


class PldrConfig(PreTrainedConfig):
    r"""
    Configuration of a PLDR-LLM.

    Args:
        vocab_size: Vocabulary size.
        hidden_size: Model width D; must equal ``num_attention_heads * head_dim``.
        intermediate_size: Hidden width of the SwiGLU feed-forward network (``floor(D * 4 * 2 / 3)`` in the papers).
        num_hidden_layers: Number of post-norm decoder layers.
        num_attention_heads: Number of Power Law Graph Attention heads H.
        head_dim: Width d of a head; the deductive tensors A, A_LM and G_LM are d x d per head.
        hidden_act: Activation of the gated linear units (SwiGLU uses ``"silu"``).
        max_position_embeddings: Longest context the model was trained for.
        layer_norm_eps: Epsilon of every LayerNorm.
        rope_theta: Rotary embedding base.
        reference_rope: ``True`` rotates interleaved pairs (2i, 2i+1) as the original implementation does;
            ``False`` uses the ``rotate_half`` pairing (i, i + d/2) of most transformers models.
        attention_bias: Biases on the query/key/value/output projections.
        glu_bias: Biases in the gated linear units (feed-forward network and metric learner).
        final_bias: Bias on the LM head.
        num_reslayerA: Number of residual units in the metric learner.
        num_denseA: Number of gated linear units inside each residual unit of the metric learner.
        A_dff: Hidden width of the metric learner's gated linear units.
        custom_G_type: ``None`` learns G_LM with the full PLGA (metric learner + power law); ``"identity"`` fixes
            G_LM to the identity (no metric learner: scaled dot-product attention); ``"random"`` fixes it to a random
            tensor; ``"external"`` expects G_LM to be supplied after loading (for instance a G file exported from
            another model). Fixed G tensors live in the ``decoder.past_G_values`` buffer and are saved with the model.
        cache_first_G: With ``use_cache=True``, the prefill uses each row's own A/A_LM/G_LM; from the next step on the
            first batch row's serve every row (only they are cached), as in the published port.
        use_g_cache: With ``use_cache=True``, cache A_LM and G_LM (the G-cache) besides k, v and A. Without it, the
            power law step is recomputed from the cached A at every decoding step (same numbers, slower).
        deduction_cuda_graphs: In eager mode on CUDA, run each layer's deduction from the metric sum (the LayerNorm of
            A, the metric learner and the power law, forward and backward) as recorded CUDA graphs once a batch shape
            recurs: the same kernels and numbers with a fraction of the host (CPU) time, which sets the pace of small
            batches. ``False`` runs it operator by operator. Not used under ``torch.compile``, with gradient
            checkpointing, with adapters or hooks on the deduction's modules, or where the metric learner runs on
            cuBLAS rather than its Triton kernels (float32 without autocast).
        decoder_cuda_graphs: On CUDA with small batches (at most ``PldrModel.GRAPHED_STACK_MAX_ELEMENTS``
            hidden-state elements, 4 x 1024 tokens at 896 wide), run the whole decoder stack, forward and (in
            training) backward, as recorded CUDA graphs once a batch shape recurs: the same kernels and numbers, with
            the host (CPU) time of a few calls instead of every operator's. Training steps,
            evaluation forwards and ``generate()``'s prompt forward. ``False`` runs the layers operator by operator.
            Only with SDPA attention without dropout, no cache to continue from (none, or an empty dynamic or static
            one), no packed rows, no hidden states or attention weights asked for, and plain modules without hooks (no
            adapters, gradient checkpointing, FSDP). Under ``torch.compile`` see ``decoder_graphs_under_compile``.
        decoder_graphs_under_compile: Under ``torch.compile``, run the recorded decoder stack of
            ``decoder_cuda_graphs`` (where it applies; not with dynamic shapes nor while exporting) as one operator of
            the compiled graph (``pldr::decoder_stack`` and its backward) instead of letting inductor compile the
            layers: the whole stack is then a few launches, where a small batch's compiled step is paced by the host's
            launches of every kernel. Off by default until measured on a GPU (tested on CPU, where the graphs are
            emulated).
        output_pldr_attentions: Return the deductive outputs (A, A_LM, exponents, G_LM...) of every layer.
        attention_dropout: Dropout on the attention probabilities.
        initializer_range: Kept for compatibility with the published configs (the original's init is used).
    """

    model_type = "pldrllm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 896
    intermediate_size: int = 2389
    num_hidden_layers: int = 5
    num_attention_heads: int = 14
    head_dim: int = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = True
    glu_bias: bool = True
    final_bias: bool = True
    reference_rope: bool = True
    attention_dropout: float = 0.0
    num_reslayerA: int = 8
    num_denseA: int = 2
    A_dff: int = 170
    custom_G_type: str | None = None
    cache_first_G: bool = False
    use_g_cache: bool = True
    deduction_cuda_graphs: bool = True
    decoder_cuda_graphs: bool = True
    decoder_graphs_under_compile: bool = False
    output_pldr_attentions: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_pldr_options()

    def to_dict(self):
        # (``rope_scaling`` stays a key for the published configs, which hold it as null; written as null, transformers
        # >= 5.25 warns that it is deprecated where a generic config reads the file, e.g. Trainer's resume)
        out = super().to_dict()
        if out.get("rope_scaling", 0) is None:
            del out["rope_scaling"]
        return out

    def validate_architecture(self):
        super().validate_architecture()
        self.check_pldr_options()

    def check_pldr_options(self):
        """Checks every size and option, raising a ValueError that names the offending config key."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim", "max_position_embeddings", "A_dff"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PldrConfig: `{key}` must be a positive integer, got {value!r}.")
        for key in ("num_reslayerA", "num_denseA"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PldrConfig: `{key}` must be a non-negative integer, got {value!r}.")
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(
                f"PldrConfig: `hidden_size` ({self.hidden_size}) must equal `num_attention_heads` "
                f"({self.num_attention_heads}) x `head_dim` ({self.head_dim})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"PldrConfig: `head_dim` must be even for rotary embeddings, got {self.head_dim}.")
        from transformers.activations import ACT2FN

        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"PldrConfig: `hidden_act` must name a transformers activation (e.g. 'silu', as the "
                             f"papers' model), got {self.hidden_act!r}.")
        if self.custom_G_type not in CUSTOM_G_TYPES:
            raise ValueError(
                f"PldrConfig: `custom_G_type` must be one of {list(CUSTOM_G_TYPES)}, got {self.custom_G_type!r}."
            )
        for key in ("cache_first_G", "use_g_cache"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"PldrConfig: `{key}` must be true or false, got {getattr(self, key)!r}.")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"PldrConfig: `layer_norm_eps` must be positive, got {self.layer_norm_eps!r}.")
        if not self.rope_theta > 0:
            raise ValueError(f"PldrConfig: `rope_theta` must be positive, got {self.rope_theta!r}.")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"PldrConfig: `attention_dropout` must be in [0, 1), got {self.attention_dropout!r}.")
        if self.tie_word_embeddings:
            raise ValueError("PldrConfig: `tie_word_embeddings` must be False: PLDR-LLM's LM head is not tied.")
        if self.rope_scaling is not None:
            raise ValueError("PldrConfig: `rope_scaling` is not supported by PLDR-LLM; leave it null.")


__all__ = ["PldrConfig"]
