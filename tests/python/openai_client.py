"""The official `openai` client against the router (run by tests/tests/e2e/client.rs).

Usage: python openai_client.py BASE_URL MASTER_KEY
Prints one JSON object with what the client saw; exits non-zero on any client error.
"""
import json
import sys

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(api_key=key, base_url=base_url, timeout=20.0, max_retries=0)
out = {"openai_version": openai.__version__}

resp = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
out["chat"] = {"content": resp.choices[0].message.content, "model": resp.model, "finish_reason": resp.choices[0].finish_reason}

pieces = []
finish = None
stream = client.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "Hello!"}], stream=True
)
for chunk in stream:
    if chunk.choices:
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
out["stream"] = {"chunks": len(pieces), "content": "".join(pieces), "finish_reason": finish}

out["models"] = sorted(m.id for m in client.models.list())

try:
    OpenAI(api_key="sk-wrong", base_url=base_url, timeout=20.0, max_retries=0).models.list()
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
