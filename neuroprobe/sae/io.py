"""Read and write SAEs on disk: SAELens' format and EleutherAI sparsify's.

SAELens (the format neuroprobe writes)::

    DIR/cfg.json                  d_in, d_sae, dtype, device, apply_b_dec_to_input,
                                  normalize_activations, reshape_activations, metadata{...},
                                  architecture (standard | jumprelu | topk), k and
                                  rescale_acts_by_decoder_norm (topk)
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                                  b_dec [d_in], threshold [d_sae] (jumprelu)

Configs from before SAELens 6 (``activation_fn_str`` / ``activation_fn`` with
``activation_fn_kwargs.k``, no ``architecture``) are read too.

sparsify (read only)::

    DIR/cfg.json                  activation (topk), num_latents or expansion_factor, k, d_in,
                                  normalize_decoder, multi_topk, skip_connection, transcode
    DIR/sae.safetensors           encoder.weight [d_sae, d_in], encoder.bias [d_sae],
                                  W_dec [d_sae, d_in], b_dec [d_in]

sparsify's encoder is ``topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))``, the
same function as SAELens' topk with ``W_enc = encoder.weight.T``.  What neither
neuroprobe nor the error term could represent (transcoders, skip connections,
group-max activations, input normalisation that is not stored with the SAE) is
refused in one sentence.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neuroprobe.errors import NeuroprobeError
from neuroprobe.sae.model import SparseAutoencoder

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
#: the SAELens config version whose fields neuroprobe writes (SAELens reads configs without it as pre-6)
SAELENS_FORMAT_VERSION = "6.0.0"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NeuroprobeError(f"{path} is not a readable JSON config ({type(err).__name__}).") from None
    if not isinstance(data, dict):
        raise NeuroprobeError(f"{path} is not a JSON object.")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as err:
        raise NeuroprobeError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:120]}).") from None


def sae_format(path: str | Path) -> str:
    """``"saelens"`` or ``"sparsify"``: which format the folder ``path`` holds.

    Raises
    ------
    NeuroprobeError
        When the folder holds neither (with what it does hold, e.g. several SAEs in sub-folders).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise NeuroprobeError(f"SAE folder {p} does not exist; give the folder with cfg.json and the weights.")
    if (p / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    inner = sorted(str(c.parent.relative_to(p)) for c in p.glob("*/" + SAELENS_CFG))
    if inner:
        raise NeuroprobeError(f"{p} holds several SAEs ({', '.join(inner[:4])}{'...' if len(inner) > 4 else ''}); "
                              f"give the folder of one of them.")
    raise NeuroprobeError(f"{p} holds no SAE: it needs cfg.json with {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify).")


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Load an SAE saved by SAELens, by sparsify, or by neuroprobe (SAELens' format).

    Parameters
    ----------
    path
        The SAE's folder.

    Returns
    -------
    SparseAutoencoder
        With ``meta`` holding ``path``, ``format``, ``file_hash`` (SHA-256 of the config
        and weight files) and the config's ``hook_name`` / ``model_name`` when known.
    """
    p = Path(path).expanduser()
    fmt = sae_format(p)
    if not (p / SAELENS_CFG).is_file():
        raise NeuroprobeError(f"{p} has weights but no {SAELENS_CFG}.")
    cfg = _read_json(p / SAELENS_CFG)
    if fmt == "saelens":
        sae = _from_saelens(cfg, _read_tensors(p / SAELENS_WEIGHTS), p)
    else:
        sae = _from_sparsify(cfg, _read_tensors(p / SPARSIFY_WEIGHTS), p)
    sae.meta.update(path=str(p.resolve()), format=fmt, file_hash=file_hash(p))
    return sae


def file_hash(path: str | Path) -> str:
    """SHA-256 over the SAE folder's config and weight files (names and bytes)."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    for name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
        f = p / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _need(tensors: dict[str, torch.Tensor], names: list[str], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise NeuroprobeError(f"{where} lacks the tensor(s) {', '.join(missing)}; it has {', '.join(sorted(tensors)) or 'none'}.")


def _from_saelens(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> SparseAutoencoder:
    meta = dict(cfg.get("metadata") or {})
    version = str(meta.get("sae_lens_version") or cfg.get("sae_lens_version") or "")
    arch = cfg.get("architecture")
    if arch is None:  # SAELens < 6: the activation names the architecture
        act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        arch = "topk" if act == "topk" else "standard" if act in ("relu", None) else str(act)
        if arch == "topk":
            cfg = {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))}
    if arch not in ("standard", "jumprelu", "topk"):
        raise NeuroprobeError(f"{where}: SAELens architecture {arch!r} is not supported; neuroprobe reads standard, jumprelu and topk SAEs.")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise NeuroprobeError(f"{where}: normalize_activations={norm!r} rescales inputs by a factor the folder does not "
                              f"carry; fold it into the weights first (SAELens: fold_activation_norm_scaling_factor) and save again.")
    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is not None and not torch.all(scale == 1):
        raise NeuroprobeError(f"{where}: a fine-tuning scaling factor is not supported; fold it into W_dec and save again.")
    _need(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else []), where)
    for key in ("d_in", "d_sae"):
        want = cfg.get(key)
        have = tensors["W_enc"].shape[0 if key == "d_in" else 1]
        if want is not None and int(want) != int(have):
            raise NeuroprobeError(f"{where}: cfg.json says {key}={want} but W_enc is {tuple(tensors['W_enc'].shape)}.")
    dtype = str(cfg.get("dtype", "float32")).replace("torch.", "")
    cast = _DTYPES.get(dtype)
    if cast is not None:
        tensors = {k: v.to(cast) for k, v in tensors.items()}
    meta.update(hook_name=meta.get("hook_name", cfg.get("hook_name")), model_name=meta.get("model_name", cfg.get("model_name")),
                sae_lens_version=version)
    return SparseAutoencoder(
        tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], architecture=arch,
        threshold=tensors.get("threshold"), k=cfg.get("k"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and arch == "topk",
        meta=meta,
    )


def _from_sparsify(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> SparseAutoencoder:
    if cfg.get("transcode"):
        raise NeuroprobeError(f"{where} is a sparsify transcoder (it predicts another activation); only autoencoders can be a site's features.")
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise NeuroprobeError(f"{where} has a skip connection; neuroprobe reads sparsify autoencoders without one.")
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise NeuroprobeError(f"{where}: sparsify activation {act!r} is not supported; neuroprobe reads topk.")
    _need(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], where)
    W = tensors["encoder.weight"]
    d_in = cfg.get("d_in")
    if d_in is not None and int(d_in) != W.shape[1]:
        raise NeuroprobeError(f"{where}: cfg.json says d_in={d_in} but encoder.weight is {tuple(W.shape)}.")
    return SparseAutoencoder(W.T.contiguous(), tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"],
                             architecture="topk", k=int(cfg.get("k", 32)), apply_b_dec_to_input=True,
                             meta={"sparsify_cfg": cfg})


def saelens_config(sae: SparseAutoencoder, **metadata: Any) -> dict[str, Any]:
    """The SAELens (6.x) ``cfg.json`` dict for ``sae``; ``metadata`` goes under ``metadata``."""
    dtype = str(sae.W_enc.dtype).replace("torch.", "")
    from neuroprobe import __version__

    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "written_by": f"neuroprobe {__version__}"}
    meta.update({k: v for k, v in metadata.items() if v is not None})
    cfg: dict[str, Any] = {
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": meta, "architecture": sae.architecture,
    }
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm)
    return cfg


def save_sae(sae: SparseAutoencoder, path: str | Path, **metadata: Any) -> Path:
    """Write ``sae`` in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``) into folder ``path``.

    Parameters
    ----------
    sae
        The SAE.
    path
        The folder (created; files in it are replaced).
    **metadata
        Extra ``metadata`` entries of the config (``hook_name`` = the site, ``model_name`` = the subject...).

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in sae.state().items()}, str(p / SAELENS_WEIGHTS))
        (p / SAELENS_CFG).write_text(json.dumps(saelens_config(sae, **metadata), indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise NeuroprobeError(f"cannot write the SAE to {p} ({err.strerror}).") from None
    return p
