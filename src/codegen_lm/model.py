"""The CodeGen network (GPT-J family): rotary attention and an MLP side by side under one LayerNorm.

Internal weight layout differs from the released checkpoints in one place, the fused q/k/v
projection: checkpoints store it as 4 blocks of (query, value, key) with interleaved rotary pairs;
we keep [query; key; value] with the rotary dimensions of every head de-interleaved (even dims first,
then odd dims), so a split is a view and rotary is two half-width multiplies. `checkpoint.py`
converts once at load and back at save; the maths is the same (q.k is unchanged when q and k are
permuted alike).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import CodeGenConfig
from .generation_config import GenerationConfig
from .kv_cache import KVCache
from .outputs import ModelOutput


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def rotary_table(n_positions: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * 10000^(-2i/rotary_dim), `[n_positions, rotary_dim // 2]`, in fp32."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(n_positions, dtype=torch.int64).float()[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of each head of `x` [..., D] (e.g. [B, T, H, D] with cos
    and sin [B, T, 1, rotary/2]), in fp32.

    With the de-interleaved layout the pair (2i, 2i+1) of the original lives at (i, r/2 + i).
    """
    r = 2 * cos.shape[-1]
    x1, x2 = x[..., : r // 2].float(), x[..., r // 2 : r].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., r:]), dim=-1) if r < x.shape[-1] else rotated


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, dropout: float
) -> torch.Tensor:
    """Scaled dot-product attention over [B, H, T, D]; half-precision models get fp32 scores and
    softmax (as the reference implementation computes them), fp32 models the fused kernel."""
    scale = q.shape[-1] ** -0.5
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if mask is not None:  # additive (from causal_mask) or boolean (True = may attend)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            scores = scores + mask
    probs = F.dropout(scores.softmax(dim=-1).to(v.dtype), dropout)
    return torch.matmul(probs, v)


def causal_mask(
    query_len: int, key_len: int, device: torch.device, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive fp32 mask [B or 1, 1, query_len, key_len]: 0 where a query may attend, a very large
    negative number elsewhere (not -inf, so that a fully masked padding row stays finite)."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    allowed = torch.arange(key_len, device=device)[None, :] <= query_pos
    if attention_mask is not None:
        allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    else:
        allowed = allowed[None, None]
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class CodeGenAttention(nn.Module):
    def __init__(self, config: CodeGenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.dropout = config.attn_pdrop
        self.qkv_proj = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # [q; k; v], see module doc
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, E = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k = apply_rotary(qkv[:, :, :2], cos[:, :, None], sin[:, :, None]).transpose(1, 3).unbind(2)
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:  # anything with update(layer, k, v) -> all keys and values to attend to
            k, v = cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, E))


class CodeGenMLP(nn.Module):
    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.inner_dim)
        self.fc_out = nn.Linear(config.inner_dim, config.n_embd)
        self.act = _ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class CodeGenBlock(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)): one LayerNorm feeds both branches, which run in parallel."""

    def __init__(self, config: CodeGenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CodeGenAttention(config, layer_idx)
        self.mlp = CodeGenMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cos, sin, mask, causal, cache) -> torch.Tensor:
        h = self.ln_1(x)
        attn = self.resid_dropout(self.attn(h, cos, sin, mask, causal, cache))
        return attn + self.resid_dropout(self.mlp(h)) + x


class CodeGenPreTrainedModel(nn.Module):
    """Loading, saving, initialisation and generation shared by both model classes."""

    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__()
        self.config = config
        self.name_or_path: str | None = None
        self.generation_config = GenerationConfig.from_model_config(config)  # generate's defaults

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward instead of storing them: activation
        memory drops to one tensor per block for about a third more compute."""
        for module in self.modules():
            if isinstance(module, CodeGenModel):
                module.gradient_checkpointing = enable

    def tie_weights(self) -> None:
        """Share lm_head.weight with the embedding when the config asks for it."""
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.transformer.wte.weight

    # ---- embeddings (the `transformers` accessors) --------------------------------------------------

    def _base(self) -> CodeGenModel:
        return self.transformer if hasattr(self, "transformer") else self  # type: ignore[return-value]

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (`transformer.wte`)."""
        return self._base().wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self._base().wte = value

    def get_output_embeddings(self) -> nn.Module | None:
        """The language-model head (`lm_head`); None for a bare CodeGenModel."""
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Module) -> None:
        if not hasattr(self, "lm_head"):
            raise AttributeError(f"{type(self).__name__} has no output embeddings (no lm_head)")
        self.lm_head = value

    @torch.no_grad()
    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary to `new_num_tokens` rows (rounded up to a multiple of
        `pad_to_multiple_of`), in the embedding and the lm_head (weight and bias); config.vocab_size
        follows. Returns the embedding module. Existing rows are kept; rows added are drawn as
        `transformers` draws them (the same random numbers in the same order, so the same values for
        the same RNG state): with `mean_resizing`, from a normal distribution with the old rows' mean
        and 1e-9 times their covariance (the bias: the old mean, 1e-9 times the old std), else
        N(0, initializer_range) weights and a zero bias; with tied embeddings the head's new bias
        entries are 0. Nothing changes when both sizes are None."""
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"cannot resize a token embedding of type {type(embeddings).__name__}")
        if new_num_tokens is None:
            new_num_tokens = embeddings.num_embeddings
        if not _positive_int(new_num_tokens):
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        if pad_to_multiple_of is not None:
            if not _positive_int(pad_to_multiple_of):
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        head = self.get_output_embeddings()
        if head is not None and not isinstance(head, nn.Linear):
            raise TypeError(f"cannot resize an lm_head of type {type(head).__name__} (resize before quantizing)")
        old_num_tokens = embeddings.num_embeddings
        tied = head is not None and head.weight is embeddings.weight
        if new_num_tokens != old_num_tokens:
            std = self.config.initializer_range
            added = new_num_tokens - old_num_tokens
            weight = embeddings.weight
            new = nn.Embedding(new_num_tokens, weight.shape[1], device=weight.device, dtype=weight.dtype).weight
            if added > 0:
                if mean_resizing:
                    new[old_num_tokens:] = _rows_like(weight, added)
                else:
                    new.normal_(0.0, std)
            new[: min(old_num_tokens, new_num_tokens)] = weight[:new_num_tokens]
            embeddings.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
            embeddings.num_embeddings = new_num_tokens
            if embeddings.padding_idx is not None and embeddings.padding_idx >= new_num_tokens:
                embeddings.padding_idx = None
            if tied:  # the weight is the embedding's; the bias keeps its rows, new ones 0 (as transformers)
                if head.bias is not None:
                    bias = torch.zeros(new_num_tokens, dtype=head.bias.dtype, device=head.bias.device)
                    keep = min(old_num_tokens, new_num_tokens)
                    bias[:keep] = head.bias[:keep]
                    head.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
                head.out_features = new_num_tokens
            elif head is not None:
                self.set_output_embeddings(_resized_head(head, new_num_tokens, mean_resizing, std))
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return embeddings

    def init_weights(self) -> None:
        """The reference initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_config(
        cls, config: CodeGenConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> CodeGenPreTrainedModel:
        """A randomly initialised model, built without first running PyTorch's default init."""
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()
        model.init_weights()
        model.reset_rotary()
        return model

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
    ) -> CodeGenPreTrainedModel:
        """Load a checkpoint folder or hub repository (offline: the local hub cache).

        dtype: None = fp32 on CPU and the checkpoint's dtype on GPU; "auto" = the checkpoint's dtype.
        torch_dtype is the older `transformers` name of the same argument. quantize="int8" swaps every
        Linear for int8 weight-only storage (see quantize.py); int8 checkpoints load as such.
        """
        from .checkpoint import load_pretrained, resolve_model_dir

        if torch_dtype is not None:
            if dtype is not None:
                raise ValueError("pass dtype or torch_dtype, not both")
            dtype = torch_dtype

        model = load_pretrained(cls, name_or_path, dtype=dtype, device=device, strict=strict,
                                revision=revision, cache_dir=cache_dir, quantize=quantize)
        folder = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir)
        model.generation_config = GenerationConfig.from_pretrained(folder, model.config)
        return model

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write config.json and HF-layout safetensors that `transformers` loads as well."""
        from .checkpoint import save_pretrained

        save_pretrained(self, folder, max_shard_size=max_shard_size, state_dict=state_dict)
        if hasattr(self, "lm_head"):  # models that generate carry their defaults along, as transformers does
            self.generation_config.save_pretrained(folder)


class CodeGenModel(CodeGenPreTrainedModel):
    """Embeddings, blocks and the final LayerNorm: returns the final hidden states."""

    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(CodeGenBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rotary()
        if self.wte.weight.device.type != "meta":
            self.init_weights()

    def reset_rotary(self) -> None:
        """(Re)compute the rotary tables, which are not stored in checkpoints."""
        device = self.wte.weight.device
        cos, sin = rotary_table(self.config.n_positions, self.config.rotary_dims)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def new_cache(self, batch: int, capacity: int, grow: bool = False) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layer, batch, cfg.n_head, cfg.head_dim, capacity, self.wte.weight.dtype,
                       self.wte.weight.device, max_capacity=cfg.n_positions if grow else None)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        """Hidden states of `input_ids` [B, T] given `past_key_values` for the tokens before them.

        attention_mask covers past and new tokens ([B, past + T]); left padding is masked out and,
        when position_ids is None, real positions are counted from the mask.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            x = self.wte(_check_ids(input_ids, self.config.vocab_size, "input_ids"))
        else:
            x = inputs_embeds
        B, T = x.shape[:2]
        if T == 0:
            raise ValueError("input_ids has no tokens (shape [B, 0])")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(B, T, grow=True)
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the model's context of {self.config.n_positions} positions"
            )
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"past_key_values hold {cache.batch_size} rows but the input has {B}")
            cache.reserve(T)
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, past + T)} "
                    "(past and new tokens)"
                )
            if bool(attention_mask.all()):
                attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None]
        if token_type_ids is not None:
            x = x + self.wte(_check_ids(token_type_ids, self.config.vocab_size, "token_type_ids"))
        x = self.drop(x)

        cos = self.rope_cos[position_ids].unsqueeze(2)  # [B or 1, T, 1, rotary/2]
        sin = self.rope_sin[position_ids].unsqueeze(2)
        causal = attention_mask is None and past == 0 and T > 1
        mask = None
        if attention_mask is not None or (past > 0 and T > 1):
            mask = causal_mask(T, past + T, x.device, attention_mask)

        hidden_states = [] if output_hidden_states else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if hidden_states is not None:
                hidden_states.append(x)
            if recompute:  # keep only block inputs; recompute the rest during backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, causal, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, causal, cache)
        x = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)
        if cache is not None:
            cache.advance(T)
        return BaseModelOutput(x, cache, tuple(hidden_states) if hidden_states is not None else None)


class CodeGenForCausalLM(CodeGenPreTrainedModel):
    """CodeGenModel plus the (untied, biased) language-model head."""

    def __init__(self, config: CodeGenConfig) -> None:
        super().__init__(config)
        self.transformer = CodeGenModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        if self.lm_head.weight.device.type != "meta":
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=config.initializer_range)
            nn.init.zeros_(self.lm_head.bias)
        self.tie_weights()

    def reset_rotary(self) -> None:
        self.transformer.reset_rotary()

    def new_cache(self, batch: int, capacity: int, grow: bool = False) -> KVCache:
        return self.transformer.new_cache(batch, capacity, grow)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits (of the last `logits_to_keep` positions, all when 0) and, with labels, the mean
        next-token cross-entropy (labels are shifted here; -100 is ignored)."""
        out = self.transformer(input_ids, attention_mask, position_ids, past_key_values, token_type_ids,
                               inputs_embeds, use_cache, output_hidden_states)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(logits.shape[:2])}")
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutput(loss, logits, out.past_key_values, out.hidden_states)

    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Continue `inputs` / `input_ids` ([B, T], left-padded with an attention_mask): see
        `generation.generate` (token ids, or with return_dict_in_generate an output object)."""
        from .generation import generate

        return generate(self, inputs, **kwargs)

    def compute_transition_scores(self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                                  beam_indices: torch.Tensor | None = None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """Each generated token's score from generate's `scores`: see `generation.compute_transition_scores`."""
        from .generation import compute_transition_scores

        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rows_like(weight: torch.Tensor, count: int) -> torch.Tensor:
    """`count` new rows for a matrix of token rows, as `transformers` draws them: from N(mean of the
    rows, 1e-9 x their covariance) when that covariance is positive definite, else the mean itself."""
    rows = weight.float()
    mean = rows.mean(dim=0)
    centred = rows - mean
    covariance = 1e-9 * (centred.T @ centred / rows.shape[0])
    if bool(torch.distributions.constraints.positive_definite.check(covariance).all()):
        normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        return normal.sample((count,)).to(weight.dtype)
    return mean[None].expand(count, -1).to(weight.dtype)


def _resized_head(head: nn.Linear, new_num_tokens: int, mean_resizing: bool, std: float) -> nn.Linear:
    """A new (untied) lm_head of `new_num_tokens` outputs holding the old rows (weight and bias), the
    added ones initialised as resize_token_embeddings says."""
    weight, bias = head.weight, head.bias
    old_num_tokens = head.out_features
    added = new_num_tokens - old_num_tokens
    new = nn.Linear(weight.shape[1], new_num_tokens, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.requires_grad_(False)
    if added > 0 and mean_resizing:
        new.weight[old_num_tokens:] = _rows_like(weight, added)
        if bias is not None:
            mean, spread = bias.float().mean(), bias.std().float()
            new.bias[old_num_tokens:].normal_(float(mean), 1e-9 * float(spread))
    elif added > 0:
        new.weight.normal_(0.0, std)
        if bias is not None:
            new.bias.zero_()
    keep = min(old_num_tokens, new_num_tokens)
    new.weight[:keep] = weight[:keep]
    if bias is not None:
        new.bias[:keep] = bias[:keep]
    new.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    return new


def _check_ids(ids: torch.Tensor, vocab_size: int, name: str) -> torch.Tensor:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, tokens], got {tuple(ids.shape)}")
    if torch.compiler.is_compiling():  # a host-side check would break the graph; the lookup checks too
        return ids
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"{name} contains token id {bad}, outside the vocabulary of {vocab_size}")
    return ids
