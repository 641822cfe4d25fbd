"""Chat with a running potluck node through the official openai client.

potluck node start --model PATH.gguf &
python examples/openai_chat.py "Who are you?"
"""

import sys

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8642/v1", api_key="unused")
model = client.models.list().data[0].id
question = " ".join(sys.argv[1:]) or "Hello!"
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": question}], max_tokens=128, stream=True
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
