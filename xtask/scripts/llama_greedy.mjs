// Greedy continuations by llama.cpp (node-llama-cpp's prebuilt CPU binary) of prompts given as
// token ids, llama.cpp's own tokenization of each prompt's text, and llama.cpp's choice at each
// step of a given continuation (teacher forcing).
//
//   node llama_greedy.mjs NODE_DIR < request.json > answers.json
//
// request: {"gguf": PATH, "prompts": [{"ids": [...], "text": "...", "forced": [...]}],
//           "max_new_tokens": N, "threads": T}
// answers: {"node_llama_cpp": VERSION, "llama_cpp": RELEASE, "answers": [{"ids": [...],
//           "tokenized": [...], "forced": [{"token": ID, "logit": X, "forced_logit": Y,
//           "rival_logit": Z}]}]}:
// `ids` are the new ids up to and including an end-of-generation token; `tokenized` is
// llama.cpp's ids for the prompt text (special tokens parsed); `forced[k]` is llama.cpp's greedy
// token after the prompt and the first k forced ids, its logit and the logit of forced id k; at
// the step where `ids` first leave the forced ids, `rival_logit` is the logit of `ids`' token
// there (teacher-forced in one batch, where `ids` came one token at a time).
// Run by `cargo xtask llama-cpp-check`. `build: "never"`: never download or compile llama.cpp.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const nodeDir = path.resolve(process.argv[2]);
const require = createRequire(path.join(nodeDir, "package.json"));
const { getLlama, LlamaLogLevel } = await import(require.resolve("node-llama-cpp"));
const version = JSON.parse(
  readFileSync(path.join(nodeDir, "node_modules/node-llama-cpp/package.json"), "utf8")).version;

const req = JSON.parse(readFileSync(0, "utf8"));
const threads = req.threads ?? 1;
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: threads });
const model = await llama.loadModel({ modelPath: req.gguf, gpuLayers: 0 });
const context = await model.createContext({ contextSize: 512, batchSize: 512, threads });
const sequence = context.getSequence();
const greedy = { temperature: 0, topK: 1, topP: 1, minP: 0 };

// llama.cpp's choice after each prefix of `forced`, in one batch over prompt + forced; at
// step `part`, also the logit of `rival`.
async function teacherForced(prompt, forced, part, rival) {
  if (forced.length === 0) return [];
  await sequence.clearHistory();
  const n = prompt.length;
  const items = [...prompt, ...forced.slice(0, -1)].map((t, i) => {
    if (i < n - 1) return t;
    const k = i - (n - 1);
    const tokens = k === part && rival !== undefined ? [forced[k], rival] : [forced[k]];
    return [t, { generateNext: { token: true, options: { temperature: 0 },
      logits: { filter: { tokens, includeTop: 1, includeSelected: true } } } }];
  });
  const res = await sequence.controlledEvaluate(items);
  const steps = [];
  for (let k = 0; k < forced.length; k++) {
    const next = res[n - 1 + k].next;
    const step = { token: next.token, logit: next.logits.get(next.token), forced_logit: next.logits.get(forced[k]) };
    if (k === part && rival !== undefined) step.rival_logit = next.logits.get(rival);
    steps.push(step);
  }
  return steps;
}

const answers = [];
for (const p of req.prompts) {
  await sequence.clearHistory();
  const ids = [];
  // temperature 0: the addon's sampler is llama_sampler_init_greedy (argmax).
  for await (const t of sequence.evaluate(p.ids, { ...greedy, yieldEogToken: true })) {
    ids.push(t);
    if (model.isEogToken(t) || ids.length >= req.max_new_tokens) break;
  }
  const want = p.forced ?? [];
  let part = 0;
  while (part < ids.length && part < want.length && ids[part] === want[part]) part++;
  const forced = await teacherForced(p.ids, want, part, ids[part]);
  answers.push({ ids, tokenized: Array.from(model.tokenize(p.text, true)), forced });
}
process.stdout.write(JSON.stringify({ node_llama_cpp: version, llama_cpp: llama.llamaCppRelease, answers }));
await context.dispose();
await model.dispose();
