// Shared by the playground and the dashboard: API calls with the server's key, asked for on a 401 and kept
// in sessionStorage (this tab only), and an SSE reader over fetch (EventSource cannot send a key or a body).
"use strict";

const KEY_STORAGE = "roofline-api-key";

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

let pendingKey = null;  // one dialog at a time: concurrent 401s share the answer

// Show the key dialog; resolves with the key typed, or null when the user cancels.
function askForKey(message) {
  if (!pendingKey) pendingKey = showKeyDialog(message).finally(() => { pendingKey = null; });
  return pendingKey;
}

function showKeyDialog(message) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  input.value = "";
  return new Promise((resolve) => {
    const form = dialog.querySelector("form");
    const done = (value) => {
      form.onsubmit = null;
      dialog.onclose = null;
      dialog.close();
      resolve(value);
    };
    form.onsubmit = (event) => {
      event.preventDefault();
      done(input.value.trim() || null);
    };
    document.getElementById("key-cancel").onclick = () => done(null);
    dialog.onclose = () => resolve(null);
    dialog.showModal();
    input.focus();
  });
}

// fetch() with the stored key; on a 401 asks for a key and retries, until it works or the user gives up.
async function apiFetch(path, options = {}) {
  let message = "This server needs an API key (the --api-key it was started with).";
  for (;;) {
    const headers = Object.assign({}, options.headers || {});
    const key = apiKey();
    if (key) headers["Authorization"] = "Bearer " + key;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (response.status !== 401) return response;
    const typed = await askForKey(key ? "That key was refused; try another." : message);
    if (typed === null) return response;
    sessionStorage.setItem(KEY_STORAGE, typed);
  }
}

// The error text of a failed response: OpenAI's {"error": {"message"}} when present.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// Yields the parsed JSON of each `data:` event of a text/event-stream response, until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function loadModelName(element) {
  try {
    const response = await apiFetch("/v1/models");
    if (response.ok) element.textContent = (await response.json()).data[0].id;
  } catch (e) { /* the name is decoration */ }
}
