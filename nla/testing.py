"""Tiny, seeded, locally built models and tokenizers for tests and toys (no hub, no downloads), a
fault injection for the trainers' non-finite-gradient tests, and a real local OpenAI-compatible
HTTP server for the teacher's and the judge's tests."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER_CANDIDATES = ["㈠", "㈡", "㈢"]  # single tokens here, absent from the builtin corpus


def build_tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on the builtin corpus, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nla.data.corpus import BUILTIN, iter_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in iter_documents(BUILTIN, max_docs=200)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>", unk_token=None
    )
    fast.add_tokens(MARKER_CANDIDATES)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(
    out_dir: str | Path,
    d_model: int = 64,
    n_layers: int = 4,
    seed: int = 0,
    initializer_range: float = 0.02,
    n_heads: int = 4,
) -> Path:
    """Write a tiny llama + the tiny tokenizer as an HF folder usable as `--model DIR`.

    `initializer_range` 0.2 makes a tiny model's output depend on its prompt at all (at HF's
    0.02 it barely does), which learnable toys that read an injected vector need.
    """
    from nla.models.sources import tiny_llama

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer()
    model = tiny_llama(
        len(tok),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        seed=seed,
        initializer_range=initializer_range,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3", "gemma3", "gemma3-multimodal")


def tiny_config(arch: str, vocab_size: int, special: dict[str, int], d_model: int = 64, n_layers: int = 4):
    """A transformers config of a tiny random model of `arch` (one of ARCHITECTURES)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **special,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=32)
    if arch == "phi3":  # fused qkv_proj / gate_up_proj
        return tf.Phi3Config(**common)
    gemma = dict(common, head_dim=d_model // 4, sliding_window=16, tie_word_embeddings=True)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**gemma)
    if arch == "gemma3-multimodal":  # Gemma3ForConditionalGeneration (gemma-3-4b/12b/27b): a tiny vision tower
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return tf.Gemma3Config(
            text_config=gemma,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=vocab_size - 1,
            boi_token_index=vocab_size - 2,
            eoi_token_index=vocab_size - 3,
        )
    raise ValueError(f"unknown architecture {arch!r}; one of {ARCHITECTURES}")


def save_tiny_architecture(
    out_dir: str | Path, arch: str, seed: int = 0, vocab_size: int = 600, d_model: int = 64
) -> Path:
    """An HF folder holding a tiny random model of `arch` and the tiny tokenizer (`--model DIR`); another
    `vocab_size` gives a tokenizer that splits the same text differently."""
    import torch
    import transformers as tf

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer(vocab_size)
    special = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config = tiny_config(arch, len(tok), special, d_model)
    torch.manual_seed(seed)
    cls = tf.Gemma3ForConditionalGeneration if arch == "gemma3-multimodal" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    model.eval().save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def nan_gradients_once(stepper, params) -> None:
    """Fault injection: the next time `stepper` (a `loop.OptimizerStep`) clips, the gradients of
    `params` just computed become NaN, as a bf16 overflow would make them; later steps are untouched."""
    clip = stepper.clip

    def poisoned():
        stepper.clip = clip
        for p in params:
            if p.grad is not None:
                p.grad.fill_(float("nan"))
        return clip()

    stepper.clip = poisoned


class TestChatServer:
    """A real HTTP server for `/v1/chat/completions` on 127.0.0.1 (a free port), answering each request
    body with `answer(body) -> response dict`; counts requests and concurrency, can fail its first
    `fail_first` requests with HTTP 500, and refuses a wrong API key with 401. `close()` stops it."""

    __test__ = False  # not a pytest test class

    def __init__(self, answer, fail_first: int = 0, api_key: str = ""):
        import threading
        from http.server import ThreadingHTTPServer

        self.answer, self.fail_first, self.api_key = answer, fail_first, api_key
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _handler(self):
        import json
        import time
        from http.server import BaseHTTPRequestHandler

        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                with server.lock:
                    server.requests += 1
                    n = server.requests
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    time.sleep(0.05)  # let concurrent requests overlap
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": "not found"})
                    if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                        return self._send(401, {"error": "bad key"})
                    if n <= server.fail_first:
                        return self._send(500, {"error": "overloaded"})
                    self._send(200, server.answer(body))
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
