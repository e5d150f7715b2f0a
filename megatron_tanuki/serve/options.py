"""What `tanuki serve` is told on its command line, in one record the app and the server share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeOptions:
    ckpt: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None            # --api-key or TANUKI_API_KEY; None: no auth (loopback only)
    insecure_no_api_key: bool = False     # allow a non-loopback bind without a key
    served_model_name: str | None = None  # default: the checkpoint folder's name
    max_concurrency: int = 256            # HTTP requests in progress; more -> 429 with Retry-After
    max_prompt_tokens: int | None = None  # default: the context (max_seq_len) - 1
    max_tokens_limit: int | None = None   # ceiling for max_tokens; default: the context
    default_max_tokens: int = 512         # when a request gives none (bounded by the ceiling)
    max_seq_len: int | None = None        # prompt + completion; default: the model's
    max_body_bytes: int = 32 * 1024 * 1024
    allow_local_images: str | None = None # image_url may name a file under this folder
    chat: str | None = None               # chat template; default tanuki / llava-v1 (Tanuki-vision)
    shutdown_grace_s: float = 30.0        # SIGTERM: finish in-flight requests for this long, then cancel
    kv_memory_gb: float | None = None
    max_tokens_per_step: int = 8192
    seed: int = 0                         # base for requests that give no seed
    tp: int = 1
    pp: int = 1
    ep: int = 1
    nproc: int | None = None
    dtype: str | None = None
    fp8: str | None = None                # e4m3 | hybrid: FP8 weights and GEMMs (Transformer Engine on GPUs)
    tokenizer: str | None = None
