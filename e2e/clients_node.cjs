// The OpenAI Node SDK against a running moeserve: node e2e/clients_node.cjs BASE_URL MODEL
// (NODE_PATH must reach the `openai` npm package). One JSON line per check on stdout:
// {"check", "ok", "seconds", "error", "detail"}; e2e/clients_check.py collects them.
"use strict";
const OpenAI = require("openai");

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 300000 });
const MAX_TOKENS = 48;
const WEATHER = {
  type: "object",
  properties: { city: { type: "string", description: "the city", maxLength: 20 },
                unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
  required: ["city", "unit"], additionalProperties: false,
};
const TOOLS = [{ type: "function", function: { name: "get_weather",
  description: "Current weather in a city", parameters: WEATHER } }];
const ASK = [{ role: "user", content: "What is the weather in Paris? Use the get_weather tool." }];

function expect(cond, what) { if (!cond) throw new Error(what); }

function weatherArgs(text) {
  const a = JSON.parse(text);
  expect(typeof a.city === "string" && ["celsius", "fahrenheit"].includes(a.unit) &&
         Object.keys(a).length === 2, `arguments do not follow the schema: ${text}`);
  return a;
}

async function check(name, fn) {
  const t = Date.now();
  let out;
  try {
    out = { check: name, ok: true, detail: String(await fn()).slice(0, 300) };
  } catch (e) {
    out = { check: name, ok: false, error: `${e.name}: ${e.message}`.slice(0, 600) };
  }
  out.seconds = Math.round((Date.now() - t) / 10) / 100;
  process.stdout.write(JSON.stringify(out) + "\n");
}

async function main() {
  await check("chat", async () => {
    const r = await client.chat.completions.create({ model, messages:
      [{ role: "user", content: "What is the capital of France?" }], max_tokens: MAX_TOKENS,
      temperature: 0 });
    const c = r.choices[0];
    expect(typeof c.message.content === "string" && c.message.content.trim(), "empty content");
    expect(["stop", "length"].includes(c.finish_reason), `finish_reason ${c.finish_reason}`);
    return c.message.content;
  });

  await check("stream", async () => {
    const s = await client.chat.completions.create({ model, stream: true, max_tokens: MAX_TOKENS,
      messages: [{ role: "user", content: "Name three rivers in Europe." }],
      stream_options: { include_usage: true } });
    let text = "", finish = null, usage = null;
    for await (const chunk of s) {
      if (chunk.usage) usage = chunk.usage;
      for (const ch of chunk.choices) {
        text += ch.delta.content || "";
        finish = ch.finish_reason || finish;
      }
    }
    expect(text.trim(), "no streamed text");
    expect(["stop", "length"].includes(finish), `finish_reason ${finish}`);
    expect(usage, "no usage chunk");
    return text;
  });

  await check("streamed named tool call", async () => {
    const s = await client.chat.completions.create({ model, stream: true, max_tokens: 64,
      messages: ASK, tools: TOOLS,
      tool_choice: { type: "function", function: { name: "get_weather" } } });
    const calls = {};
    let finish = null;
    for await (const chunk of s) {
      for (const ch of chunk.choices) {
        finish = ch.finish_reason || finish;
        for (const tc of ch.delta.tool_calls || []) {
          const slot = (calls[tc.index] ||= { id: "", name: "", arguments: "" });
          slot.id += tc.id || "";
          slot.name += (tc.function && tc.function.name) || "";
          slot.arguments += (tc.function && tc.function.arguments) || "";
        }
      }
    }
    expect(finish === "tool_calls", `finish_reason ${finish}`);
    expect(calls[0] && calls[0].name === "get_weather" && calls[0].id, JSON.stringify(calls));
    return `get_weather(${JSON.stringify(weatherArgs(calls[0].arguments))})`;
  });

  await check("stream helper + tool call", async () => {
    // chat.completions.stream() accumulates the deltas itself (finalChatCompletion)
    const s = client.chat.completions.stream({ model, max_tokens: 64, messages: ASK,
      tools: TOOLS, tool_choice: "required" });
    const final = await s.finalChatCompletion();
    const c = final.choices[0];
    const calls = c.message.tool_calls || [];
    // parallel calls allowed (the default): the 135M model often goes on calling for other
    // cities until max_tokens, so 'length' with several calls, the first ones whole, passes
    expect(c.finish_reason === "tool_calls" || (c.finish_reason === "length" && calls.length > 1),
           `finish_reason ${c.finish_reason} with ${calls.length} call(s)`);
    expect(calls[0] && calls[0].function.name === "get_weather", JSON.stringify(c.message));
    return `${calls.length} call(s), finish ${c.finish_reason}: ` +
           `get_weather(${JSON.stringify(weatherArgs(calls[0].function.arguments))})`;
  });

  await check("json_schema", async () => {
    const r = await client.chat.completions.create({ model, max_tokens: MAX_TOKENS,
      messages: [{ role: "user", content: "Invent a person: a name and an age." }],
      response_format: { type: "json_schema", json_schema: { name: "person", strict: true,
        schema: { type: "object", properties: { name: { type: "string", maxLength: 20 },
          age: { type: "integer", minimum: 0, maximum: 120 } }, required: ["name", "age"],
          additionalProperties: false } } } });
    const c = r.choices[0];
    expect(c.finish_reason === "stop", `finish_reason ${c.finish_reason}: ${c.message.content}`);
    const p = JSON.parse(c.message.content);
    expect(typeof p.name === "string" && Number.isInteger(p.age), c.message.content);
    return c.message.content;
  });

  await check("models.list", async () => {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    expect(ids.includes(model), `models ${ids}`);
    return ids.join(",");
  });
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + "\n"); process.exit(2); });
