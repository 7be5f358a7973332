// The playground: chat and completion over the server's own streaming API, every token shaded by its
// probability under the raw model distribution, its alternatives on hover or keyboard focus.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null };

function numberOrNull(id) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const value = Number(text);
  return Number.isFinite(value) ? value : null;
}

function settings() {
  return {
    mode: document.querySelector("input[name=mode]:checked").value,
    system: $("system").value.trim(),
    temperature: numberOrNull("temperature"),
    top_p: numberOrNull("top-p"),
    max_tokens: numberOrNull("max-tokens"),
    seed: numberOrNull("seed"),
    logprobs: $("logprobs").checked,
    top_logprobs: Math.max(0, Math.min(20, numberOrNull("top-logprobs") ?? 5)),
    ignore_eos: $("ignore-eos").checked,
  };
}

// The sampling fields both routes take; nulls left out so the server's defaults apply.
function samplingBody(s) {
  const body = { stream: true, stream_options: { include_usage: true } };
  for (const key of ["temperature", "top_p", "max_tokens", "seed"]) if (s[key] !== null) body[key] = s[key];
  if (s.ignore_eos) body.ignore_eos = true;
  return body;
}

// ---- tokens ---------------------------------------------------------------------------------------
function visible(text) {
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "(empty)";
}

function percent(logprob) {
  const p = Math.exp(logprob) * 100;
  return p >= 10 ? p.toFixed(1) + "%" : p >= 0.01 ? p.toFixed(2) + "%" : p.toExponential(1) + "%";
}

function shade(logprob) {
  // red (unlikely) through yellow to green (likely), always light: dark text keeps its contrast
  return `hsl(${Math.round(120 * Math.exp(logprob))}, 75%, 84%)`;
}

function tokenSpan(tok) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = tok.text;
  span.tabIndex = -1;
  span.setAttribute("aria-describedby", "token-info");
  if (tok.logprob === null) {
    span.setAttribute("aria-label", `token ${visible(tok.text)}: no logprob (the first prompt token)`);
  } else {
    span.style.backgroundColor = shade(tok.logprob);
    span.setAttribute("aria-label", `token ${visible(tok.text)}, probability ${percent(tok.logprob)}, ` +
      `logprob ${tok.logprob.toFixed(3)}`);
  }
  span.tokenData = tok;
  return span;
}

function appendToken(container, tok) {
  const span = tokenSpan(tok);
  if (!container.querySelector(".tok")) span.tabIndex = 0;  // one tab stop per message; arrows move within
  container.appendChild(span);
}

function showInfo(span) {
  const tok = span.tokenData;
  const info = $("token-info");
  info.replaceChildren();
  const title = document.createElement("h2");
  const code = document.createElement("code");
  code.textContent = visible(tok.text);
  title.append("Token ", code);
  info.appendChild(title);
  const summary = document.createElement("p");
  summary.className = "summary";
  summary.textContent = tok.logprob === null ? "The first prompt token has no logprob."
    : `probability ${percent(tok.logprob)} · logprob ${tok.logprob.toFixed(4)}`;
  info.appendChild(summary);
  if (tok.top && tok.top.length) {
    const table = document.createElement("table");
    table.innerHTML = "<caption class='sr-only'>Most likely tokens at this position</caption>" +
      "<thead><tr><th scope='col'>#</th><th scope='col'>token</th><th scope='col'>probability</th>" +
      "<th scope='col'>logprob</th></tr></thead>";
    const body = document.createElement("tbody");
    let seen = false;
    tok.top.forEach((alt, i) => {
      const row = document.createElement("tr");
      row.className = "alt";
      if (alt.token === tok.text && !seen) { row.classList.add("chosen"); seen = true; }
      const cells = [String(i + 1), null, null, alt.logprob.toFixed(4)];
      cells.forEach((text, k) => {
        const cell = document.createElement("td");
        if (k === 1) {
          const c = document.createElement("code");
          c.textContent = visible(alt.token);
          cell.appendChild(c);
        } else if (k === 2) {
          const bar = document.createElement("span");
          bar.className = "bar";
          bar.style.width = Math.max(1, Math.round(60 * Math.exp(alt.logprob))) + "px";
          cell.append(bar, " " + percent(alt.logprob));
        } else {
          cell.textContent = text;
        }
        row.appendChild(cell);
      });
      body.appendChild(row);
    });
    table.appendChild(body);
    info.appendChild(table);
    if (!seen && tok.logprob !== null) {
      const note = document.createElement("p");
      note.textContent = "The sampled token is not among these alternatives.";
      info.appendChild(note);
    }
  }
  info.hidden = false;
  const rect = span.getBoundingClientRect();
  const width = info.offsetWidth;
  const left = Math.min(rect.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - width - 8);
  info.style.left = Math.max(4, left) + "px";
  info.style.top = (rect.bottom + window.scrollY + 4) + "px";
}

function hideInfo() {
  $("token-info").hidden = true;
}

function onTokenKey(event) {
  const span = event.target;
  if (!span.classList || !span.classList.contains("tok")) return;
  const all = Array.from(span.parentElement.querySelectorAll(".tok"));
  const at = all.indexOf(span);
  const next = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1, Home: 0,
    End: all.length - 1 }[event.key];
  if (next === undefined || next < 0 || next >= all.length) return;
  event.preventDefault();
  span.tabIndex = -1;
  all[next].tabIndex = 0;
  all[next].focus();
}

// Completions' top_logprobs are {token: logprob}; the chat route's are [{token, logprob}]: one shape here.
function sortedTop(top) {
  if (!top) return [];
  const list = Array.isArray(top) ? top.map((t) => ({ token: t.token, logprob: t.logprob }))
    : Object.entries(top).map(([token, logprob]) => ({ token, logprob }));
  return list.sort((a, b) => b.logprob - a.logprob);
}

function completionTokens(logprobs) {
  return logprobs.tokens.map((text, i) => ({ text, logprob: logprobs.token_logprobs[i],
    top: sortedTop(logprobs.top_logprobs[i]) }));
}

// ---- turns --------------------------------------------------------------------------------------
function addTurn(role, label) {
  const turn = document.createElement("article");
  turn.className = "turn " + role;
  const head = document.createElement("div");
  head.className = "role";
  const name = document.createElement("span");
  name.textContent = label;
  head.appendChild(name);
  const text = document.createElement("div");
  text.className = "text";
  text.setAttribute("role", "group");
  text.setAttribute("aria-label", label + " text");
  const status = document.createElement("div");
  status.className = "status";
  status.setAttribute("role", "status");  // announced when a turn starts, finishes or stops (tokens are not)
  turn.append(head, text, status);
  $("transcript").appendChild(turn);
  return { turn, head, text, status };
}

// A user or prompt turn with a button that fetches the prompt's own logprobs (completions echo).
function addPromptTurn(role, label, content, prompt) {
  const t = addTurn(role, label);
  t.text.textContent = content;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "secondary prompt-logprobs";
  button.textContent = "Prompt logprobs";
  button.setAttribute("aria-label", "Show the prompt's tokens with their logprobs");
  button.onclick = () => showPromptLogprobs(t, prompt, button);
  t.head.appendChild(button);
  return t;
}

async function showPromptLogprobs(t, prompt, button) {
  button.disabled = true;
  t.status.textContent = "scoring the prompt…";
  try {
    let tokens = prompt.text;
    if (prompt.messages) {  // the chat template's rendering, as the chat route would send it
      const r = await apiFetch("/tokenize", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages: prompt.messages, add_generation_prompt: true }) });
      if (!r.ok) throw new Error(await errorText(r));
      tokens = (await r.json()).tokens;
    }
    const r = await apiFetch("/v1/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: tokens, max_tokens: 0, echo: true, logprobs: prompt.top_logprobs }) });
    if (!r.ok) throw new Error(await errorText(r));
    const body = await r.json();
    t.text.replaceChildren();
    for (const tok of completionTokens(body.choices[0].logprobs)) appendToken(t.text, tok);
    t.status.textContent = `${body.usage.prompt_tokens} prompt tokens, with their logprobs given the tokens before`;
    button.remove();
  } catch (err) {
    t.status.textContent = "";
    $("error").textContent = String(err.message || err);
    button.disabled = false;
  }
}

function setBusy(isBusy) {
  $("send").disabled = isBusy;
  $("stop").disabled = !isBusy;
}

function describeEnd(finish, usage, numTokens, started) {
  const seconds = (performance.now() - started) / 1000;
  const parts = [finish ? `finished: ${finish}` : "stopped"];
  const generated = usage ? usage.completion_tokens : numTokens;
  parts.push(`${generated} tokens`);
  if (seconds > 0 && generated) parts.push(`${(generated / seconds).toFixed(1)} tok/s in this browser`);
  if (usage) parts.push(`prompt ${usage.prompt_tokens} tokens`);
  return parts.join(" · ");
}

async function send() {
  const s = settings();
  const content = $("prompt").value;
  if (!content.trim() || state.controller) return;
  $("error").textContent = "";
  hideInfo();
  const body = samplingBody(s);
  let path, out, prompt;
  if (s.mode === "chat") {
    state.messages.push({ role: "user", content });
    // the system prompt as it is now, ahead of the conversation so far
    const system = s.system ? [{ role: "system", content: s.system }] : [];
    prompt = { messages: system.concat(state.messages), top_logprobs: s.top_logprobs };
    body.messages = prompt.messages;
    if (s.logprobs) { body.logprobs = true; body.top_logprobs = s.top_logprobs; }
    path = "/v1/chat/completions";
    addPromptTurn("user", "user", content, prompt);
    out = addTurn("assistant", "assistant");
  } else {
    prompt = { text: content, top_logprobs: s.top_logprobs };
    body.prompt = content;
    if (s.logprobs) body.logprobs = s.top_logprobs;
    path = "/v1/completions";
    addPromptTurn("prompt", "prompt", content, prompt);
    out = addTurn("assistant completion", "completion");
  }
  $("prompt").value = "";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  out.status.textContent = "waiting for the first token…";
  const started = performance.now();
  let text = "", finish = null, usage = null, numTokens = 0, isFailed = false;
  try {
    const response = await apiFetch(path, { method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorText(response));
    out.status.textContent = "generating…";
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = s.mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        text += delta;
        const lp = choice.logprobs;
        if (s.logprobs && lp) {
          const toks = s.mode === "chat" ? (lp.content || []).map((c) => ({ text: c.token, logprob: c.logprob,
            top: sortedTop(c.top_logprobs) })) : completionTokens(lp);
          for (const tok of toks) { appendToken(out.text, tok); numTokens++; }
        } else if (delta) {
          out.text.append(delta);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    out.status.textContent = describeEnd(finish, usage, numTokens, started);
  } catch (err) {
    if (err.name === "AbortError") {
      out.status.textContent = "stopped · " + describeEnd(null, null, numTokens, started).split(" · ").slice(1).join(" · ");
      out.turn.classList.add("stopped");
    } else {
      out.status.textContent = "failed";
      $("error").textContent = String(err.message || err);
      isFailed = true;
    }
  } finally {
    state.controller = null;
    setBusy(false);
    if (s.mode === "chat" && isFailed) state.messages.pop();  // the failed turn is not part of the conversation
    else if (s.mode === "chat") state.messages.push({ role: "assistant", content: text });
  }
}

function init() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("transcript").replaceChildren();
    hideInfo();
  });
  const syncMode = () => { $("system-box").hidden = settings().mode !== "chat"; };
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", syncMode);
  syncMode();
  const transcript = $("transcript");
  transcript.addEventListener("mouseover", (event) => {
    if (event.target.classList && event.target.classList.contains("tok")) showInfo(event.target);
  });
  transcript.addEventListener("focusin", (event) => {
    if (event.target.classList && event.target.classList.contains("tok")) showInfo(event.target);
  });
  transcript.addEventListener("keydown", onTokenKey);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") hideInfo(); });
  document.addEventListener("click", (event) => {
    if (!event.target.closest || (!event.target.closest(".tok") && !event.target.closest("#token-info"))) hideInfo();
  });
  loadModelName($("model-name"));
}

document.addEventListener("DOMContentLoaded", init);
