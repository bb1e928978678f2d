"""Chat messages to one Gemma prompt, and base64 image data URLs to pixels (with the decompression-bomb check)."""

import base64
import binascii
import io
import re

import numpy as np

START_OF_IMAGE = "<start_of_image>"
DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(?P<data>.*)$", re.DOTALL)


class RequestError(ValueError):
    """A request the server refuses: `status` (400, 413, ...) and the OpenAI error's `param`."""

    def __init__(self, message, status=400, param=None, code=None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def decode_image(url, max_pixels, param):
    """A `data:image/...;base64,...` URL to uint8 RGB pixels `(H, W, 3)`.

    Only data URLs: the server never fetches a URL. The size is read from
    the header and checked against `max_pixels` before any pixel is decoded.
    """
    from PIL import Image
    from PIL import UnidentifiedImageError

    from keras_t5gemma.models.t5gemma2.t5gemma2_image_converter import pil_image_to_rgb

    match = DATA_URL.match(url)
    if match is None:
        raise RequestError("images must be base64 data URLs (data:image/png;base64,...)", param=param)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("the image data URL is not valid base64", param=param) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    f"the image has {width}x{height} pixels; this server takes at most {max_pixels}",
                    status=413,
                    param=param,
                    code="image_too_large",
                )
            pixels = pil_image_to_rgb(image)
    except Image.DecompressionBombError:
        raise RequestError("the image is too large to decode safely", status=413, param=param) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, RequestError):
            raise
        raise RequestError(f"cannot read the image: {error}", param=param) from None
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def _content_text_and_images(content, max_pixels, param):
    """A message's content as text (each image part a `<start_of_image>` marker in its place) and images."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for index, part in enumerate(content):
        if part.type == "text":
            texts.append(part.text)
        else:
            texts.append(START_OF_IMAGE)
            images.append(decode_image(part.image_url.url, max_pixels, f"{param}.content[{index}]"))
    return "".join(texts), images


def render_chat(messages, max_pixels):
    """Messages in Gemma's turn template, ending with the model's open turn; returns `(prompt, images)`.

    `<start_of_turn>user\\n...<end_of_turn>\\n` per turn (`assistant` is
    `model`); system (and developer) messages have no turn of their own and
    go before the first user message, as Gemma's template puts them.
    """
    system, turns, images = [], [], []
    for index, message in enumerate(messages):
        text, message_images = _content_text_and_images(message.content, max_pixels, f"messages[{index}]")
        images += message_images
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            turns.append(["model" if message.role == "assistant" else "user", text])
    if not turns or turns[0][0] != "user":
        turns.insert(0, ["user", ""])
    if system:
        turns[0][1] = "\n\n".join(system) + "\n\n" + turns[0][1]
    rendered = "".join(f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in turns)
    return rendered + "<start_of_turn>model\n", images


def embedding_samples(inputs, max_pixels):
    """The `input` of an embeddings request as `(text or None, [images])` samples.

    Each item is a string, an `image_url` part (an image-only sample, as
    Termite takes them) or a list of parts (text with images in place).
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    samples = []
    for index, item in enumerate(inputs):
        param = f"input[{index}]"
        if isinstance(item, str):
            text, images = item, []
        elif isinstance(item, list):
            text, images = _content_text_and_images(item, max_pixels, param)
        else:
            text, images = None, [decode_image(item.image_url.url, max_pixels, param)]
        if text is not None and not text.strip():
            text = None
        if text is None and not images:
            raise RequestError(f"{param} is empty", param=param)
        samples.append((text, images))
    return samples
