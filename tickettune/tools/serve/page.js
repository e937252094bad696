const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1) + "%";

function bar(label, p, main) {
  const row = document.createElement("div");
  row.className = main ? "bar main" : "bar";
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = label;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = (100 * p).toFixed(1) + "%";
  track.appendChild(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = pct(p);
  row.append(name, track, value);
  return row;
}

// The API key, when the server asks for one: kept in sessionStorage (this tab only), sent as a Bearer token.
const KEY_SLOT = "tickettune-key";
let keyWaiters = [];

function authHeaders() {
  const key = sessionStorage.getItem(KEY_SLOT);
  return key ? {"Authorization": "Bearer " + key} : {};
}

function askForKey(message) {
  sessionStorage.removeItem(KEY_SLOT);
  $("key-form").hidden = false;
  $("status").textContent = message || "";
  $("key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key").value.trim();
  if (!key) { $("key").focus(); return; }
  sessionStorage.setItem(KEY_SLOT, key);
  $("key").value = "";
  $("key-form").hidden = true;
  $("status").textContent = "";
  const waiting = keyWaiters;
  keyWaiters = [];
  waiting.forEach((resolve) => resolve());
});

// fetch, asking for the key (and trying again) while the server answers 401
async function call(path, options) {
  for (;;) {
    const response = await fetch(path, {...options, headers: {...(options.headers || {}), ...authHeaders()}});
    if (response.status !== 401) return response;
    await askForKey(sessionStorage.getItem(KEY_SLOT) ? "That key was refused: try again." : "");
  }
}

async function loadDesks() {
  const response = await call("v1/models", {method: "GET"});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) return;
  const select = $("desk");
  select.replaceChildren(...(data.data || []).map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id + (m.intents && m.intents.length ? " (" + m.intents.length + " intents)" : "");
    return option;
  }));
  $("desk-row").hidden = select.options.length < 2;
}

async function triage() {
  const text = $("ticket").value;
  if (!text.trim()) { $("ticket").focus(); return; }
  $("go").disabled = true;
  $("status").textContent = "Reading the ticket\u2026";
  $("error").hidden = true;
  try {
    const body = {tickets: [{id: "page", ticket: text}]};
    if ($("desk").value) body.desk = $("desk").value;
    const response = await call("v1/tickets", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error((data.error && data.error.message) || ("HTTP " + response.status));
    show(data.predictions[0]);
    $("status").textContent = "";
  } catch (err) {
    $("error").textContent = "Could not triage this ticket: " + err.message;
    $("error").hidden = false;
    $("status").textContent = "";
  } finally {
    $("go").disabled = false;
  }
}

function show(p) {
  const scores = Object.entries(p.intent_scores).sort((a, b) => b[1] - a[1]);
  const confidence = p.intent_scores[p.predicted_intent] ?? (scores.length ? scores[0][1] : 0);
  $("intent").textContent = p.predicted_intent;
  $("confidence").replaceChildren(bar("confidence", confidence, true));
  const others = scores.filter(([label]) => label !== p.predicted_intent).slice(0, 3);
  $("alternatives").replaceChildren(...others.map(([label, q]) => bar(label, q, false)));
  $("alt-heading").hidden = others.length === 0;
  $("reply").textContent = p.prediction;
  $("source").textContent = {generated: "generated", repaired: "generated, facts restored",
                             retrieved: "composed from the desk's replies",
                             fallback: "composed from the desk's replies (generation failed)"}[p.reply_source]
                            || p.reply_source;
  $("latency").textContent = p.latency_ms + " ms";
  $("result").hidden = false;
}

$("go").addEventListener("click", triage);
$("ticket").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) triage(); });
$("copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("reply").textContent));
loadDesks();
