"""`pocketdit demo`: a local web page (gradio) to try a model: prompt, width, steps, seed -> image.

The page is served on this machine only (127.0.0.1 unless --host says otherwise); there is no public tunnel.
gradio is an optional extra (`pip install 'pocketdit[demo]'`) and is imported only when the demo runs, so this
module is cheap to import (cli.py takes `port` from it for its parser).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import threading
import time
from typing import Callable

from .argtypes import _int

# The longest side an image is shown at: a 32 px model's images are enlarged 8x, nearest-neighbour, so its
# pixels stay visible as pixels (what `generate --upscale 8` writes).
DISPLAY_SIDE = 256
MAX_STEPS = 100
MAX_SEED = 2**63 - 1  # torch generators take 0 <= seed < 2**63
PAGE_MAX_SEED = 2**32 - 1  # what the page's number box offers (a browser's numbers are exact up to 2**53 only)


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (a free one) to 65535."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 (any free one) to 65535, got {value}")
    return value


def model_widths(pipe) -> list[float]:
    """The widths the page offers: the separate models of `pipe.width_models` when the loader attached them (the
    built-in default's distilled widths), else an elastic supernet's; widest first; 1.0 for a plain model."""
    widths = getattr(pipe, "width_models", None) or getattr(pipe.transformer, "elastic_widths", None) or (1.0,)
    return sorted({float(w) for w in widths}, reverse=True)


def upscale_factor(width: int, height: int) -> int:
    return max(1, DISPLAY_SIDE // max(width, height))


def make_generate(pipe) -> Callable:
    """`generate(prompt, model_width, steps, seed) -> PIL image` on `pipe`, upscaled for display. Each width of
    a supernet is cut out once, up front (pocketdit.elastic.select_width); calls are serialised by a lock
    because they swap `pipe.transformer`."""
    from PIL import Image

    from .elastic import select_width

    full = pipe.transformer
    models = dict(getattr(pipe, "width_models", None) or {w: select_width(full, w) for w in model_widths(pipe)})
    lock = threading.Lock()

    def generate(prompt, model_width=1.0, steps=None, seed=0):
        width = float(model_width if model_width is not None else 1.0)
        if width not in models:
            raise ValueError(f"model width {width:g} is not one of {', '.join(f'{w:g}' for w in models)}")
        steps = pipe.default_steps if steps is None else int(steps)
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be from 1 to {MAX_STEPS}, got {steps}")
        seed = 0 if seed is None else int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be from 0 to 2**63 - 1, got {seed}")
        with lock:
            pipe.transformer = models[width]
            try:
                image = pipe(prompt or "", num_inference_steps=steps, seed=[seed]).images[0]
            finally:
                pipe.transformer = full
        k = upscale_factor(image.width, image.height)
        return image.resize((image.width * k, image.height * k), Image.NEAREST) if k > 1 else image

    return generate


def build_demo(pipe):
    """The page for `pipe`: a gradio.Blocks (not launched). Its generate function is `demo.generate`."""
    gr = _import_gradio()
    generate = make_generate(pipe)
    widths = model_widths(pipe)

    def on_generate(prompt, model_width, steps, seed):
        try:
            return generate(prompt, model_width, steps, seed)
        except ValueError as e:  # bad values typed into the page: a message there, not a traceback here
            raise gr.Error(str(e))

    size = pipe.default_size or 256
    image_kwargs = {"format": "png"} if "format" in _parameters(gr.Image) else {}  # lossless: pixels stay exact
    blocks_kwargs = {"delete_cache": (3600, 3600)} if "delete_cache" in _parameters(gr.Blocks) else {}  # old images
    with gr.Blocks(title="PocketDiT demo", analytics_enabled=False, **blocks_kwargs) as demo:
        gr.Markdown(f"## PocketDiT\nA {size}x{size} text-to-image model, shown enlarged "
                    f"{upscale_factor(size, size)}x (nearest-neighbour).")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="two blue squares", lines=2,
                                    elem_id="prompt")
                width = gr.Radio(choices=[(f"{w:g}", w) for w in widths], value=widths[0], label="Model width",
                                 interactive=len(widths) > 1, elem_id="model-width")
                steps = gr.Slider(1, MAX_STEPS, value=min(pipe.default_steps, MAX_STEPS), step=1, label="Steps",
                                  elem_id="steps")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=PAGE_MAX_SEED, label="Seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                output = gr.Image(label="Image", type="pil", interactive=False, elem_id="output", **image_kwargs)
        inputs = [prompt, width, steps, seed]
        button.click(on_generate, inputs=inputs, outputs=output)
        prompt.submit(on_generate, inputs=inputs, outputs=output)
    demo.generate = generate
    return demo


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version check from a local demo
    import gradio

    return gradio


def _parameters(fn) -> set:
    import inspect

    return set(inspect.signature(fn).parameters)


def _bindable_port(host: str, port: int) -> int:
    """The port to serve on (a free one for 0); an OSError naming host and port when it cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise OSError(f"--host {host!r}: {e.strerror or e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"cannot serve on {host}:{port}: {e.strerror or e}"
                          + (" (another server has it; pick another --port, or 0 for any free one)"
                             if e.errno == errno.EADDRINUSE else "")) from None
        return s.getsockname()[1]


def run_demo(args, load_pipeline: Callable) -> int:
    """`pocketdit demo`: check gradio and the address, load the model once, serve until Ctrl+C.

    `load_pipeline(args)` gives the pipeline named by args.model, or an exit code after printing why (the
    command line passes its own loader, cli._pipeline_for_command, so that this module does not import cli)."""
    from .argtypes import CLIError, quiet_loading, require_modules
    from .utils import cli_error

    try:
        require_modules(["gradio"], "`pocketdit demo`", "demo")
        _import_gradio()  # installed but broken: an ImportError here
    except (CLIError, ImportError) as e:
        msg = str(e) if isinstance(e, CLIError) else f"`pocketdit demo` cannot import gradio ({e}); " \
            "reinstall it with pip install 'pocketdit[demo]'"
        return cli_error(msg)
    try:
        port_ = _bindable_port(args.host, args.port)
    except OSError as e:
        return cli_error(str(e))

    with quiet_loading():
        pipe = load_pipeline(args)
    if isinstance(pipe, int):
        return pipe
    demo = build_demo(pipe)
    launch = dict(server_name=args.host, server_port=port_, share=False, inbrowser=False, quiet=True,
                  show_error=True, prevent_thread_lock=True)
    if "ssr_mode" in _parameters(demo.launch):  # gradio 5+: no Node.js server-side rendering
        launch["ssr_mode"] = False
    try:
        demo.launch(**launch)
    except (OSError, ValueError) as e:
        return cli_error(f"cannot serve on {args.host}:{port_}: {e}")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"pocketdit demo: http://{host}:{port_}/ (Ctrl+C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"pocketdit: warning: --host {args.host}: other machines on this network can open the page",
              flush=True)
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl+C is how a server stops: not an error
        print("pocketdit demo: stopped", flush=True)
    finally:
        demo.close()
    return 0
