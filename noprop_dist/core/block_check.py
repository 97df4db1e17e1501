"""The check every run makes of its block before anything starts: build it, run it on two images, and stop
with one line naming ``model.block`` and the problem when it breaks the block contract (core.blocks)."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .blocks import (
    BlockError,
    ModelSpec,
    block_factory,
    build_shard,
    prefers_channels_last,
)


def _brief(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def check_block(spec: ModelSpec, x: torch.Tensor, seed: int) -> None:
    """Build the first and the last shard as training will and run each on ``x`` (2, C, H, W) normalised images,
    in train and in eval mode; BlockError (one line naming model.block and the problem) when the factory does not
    import, takes the wrong arguments, raises, returns no nn.Module, builds non-finite or no parameters, or when
    the forward takes the wrong arguments, raises, or returns anything but finite float logits (2, m) that
    depend on the parameters. The global RNG is left as it was."""
    name = f"model.block={spec.block}"
    factory = block_factory(spec)
    try:
        inspect.signature(factory).bind(spec.block_spec(1))
    except TypeError as e:
        raise BlockError(f"{name}: the factory must take one argument, a noprop_dist BlockSpec ({e})") from None
    except ValueError:  # a builtin or C callable without a signature: let the call below tell
        pass
    with torch.random.fork_rng(devices=[]):
        for k in sorted({1, spec.num_shards}):
            try:
                net = build_shard(spec, k, seed)
            except BlockError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
                raise BlockError(f"{name}: the factory raised {_brief(e)} building shard {k}") from None
            _check_network(spec, name, k, net, x)


def _check_network(spec: ModelSpec, name: str, k: int, net: nn.Module, x: torch.Tensor) -> None:
    """Shard k's network against the contract (see :func:`check_block`)."""
    params = list(net.named_parameters())
    if not any(p.requires_grad for _, p in params):
        raise BlockError(f"{name}: shard {k}'s network has no trainable parameters")
    bad = next((n for n, p in [*params, *net.named_buffers()] if p.is_floating_point() and not p.isfinite().all()),
               None)
    if bad is not None:
        raise BlockError(f"{name}: shard {k}'s network has non-finite initial values in {bad}")
    gen = torch.Generator().manual_seed(0)
    if prefers_channels_last(net):  # as training runs it (training.loop)
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    z = torch.randn((x.shape[0], spec.embed_dim), generator=gen)
    args = (z, x, torch.rand(x.shape[0], generator=gen)) if spec.block_spec(k).time_conditioned else (z, x)
    form = "forward(z, x, t)" if len(args) == 3 else "forward(z, x)"
    for mode in ("train", "eval"):
        net.train(mode == "train")
        try:
            with torch.set_grad_enabled(mode == "train"):
                out = net(*args)
        except TypeError as e:
            raise BlockError(f"{name}: shard {k}'s {form} failed ({_brief(e)}); for model.method={spec.method} a "
                             f"block is called as {form}") from None
        except Exception as e:  # noqa: BLE001
            raise BlockError(f"{name}: shard {k}'s {form} raised {_brief(e)} in {mode} mode on 2 images "
                             f"{tuple(x.shape)}") from None
        _check_logits(spec, name, k, form, mode, out)
        if mode == "eval" and len(args) == 3 and hasattr(net, "encode_image") and hasattr(net, "forward_features"):
            with torch.no_grad():
                split = net.forward_features(net.encode_image(x), z, args[2])
            if not torch.allclose(split, out, rtol=1e-4, atol=1e-5):
                raise BlockError(f"{name}: shard {k}'s forward_features(encode_image(x), z, t) disagrees with its "
                                 "forward(z, x, t); the samplers use the first: make them agree or drop both")


def _check_logits(spec: ModelSpec, name: str, k: int, form: str, mode: str, out: object) -> None:
    what = f"{name}: shard {k}'s {form} in {mode} mode"
    if not isinstance(out, torch.Tensor):
        raise BlockError(f"{what} returned a {type(out).__name__}; expected class logits, a tensor "
                         f"(B, m) = (2, {spec.num_classes})")
    if tuple(out.shape) != (2, spec.num_classes) or not out.is_floating_point():
        raise BlockError(f"{what} returned {out.dtype} {tuple(out.shape)}; expected float class logits (B, m) = "
                         f"(2, {spec.num_classes})")
    if not out.isfinite().all():
        raise BlockError(f"{what} returned non-finite logits")
    if mode == "train" and not out.requires_grad:
        raise BlockError(f"{what} returned logits that do not depend on the network's parameters: nothing to train")
