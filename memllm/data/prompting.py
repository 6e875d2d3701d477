"""How a task's prompt and target reach the model: raw text, or inside the chat template.

Instruction-tuned models (the bundled SmolLM2-135M-Instruct among them) answer a raw
``...Answer:`` prompt with their end-of-turn token; BabiLong's own evaluation wraps instruct
models' inputs in their chat template. With ``model.chat_template: true`` the prompt becomes the
user turn and the target the assistant's reply (ended by the end-of-turn token the template
uses), for training and evaluation alike.
"""

from __future__ import annotations


def chat_wrap(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn followed by the assistant header, as text."""
    if not getattr(tokenizer, "chat_template", None):
        from memllm.errors import ConfigError

        raise ConfigError("model.chat_template: this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def format_example(tokenizer, prompt: str, target: str, chat: bool) -> tuple[str, str]:
    """The (prompt, target) texts the model is trained and evaluated on."""
    if not chat:
        return prompt, target
    # an assistant reply starts right after the header: no leading space before the answer
    return chat_wrap(tokenizer, prompt), target.lstrip()
