// crossfade's dashboard: polls the coordinator's REST API (/v1/...) once a
// second and draws every endpoint (its deployments, the promotion under
// way with its split as a bar and over time, replicas, the time left to
// stabilize, events in full) and every worker, with the promotion
// controls. Everything a user or an engine wrote is set as text, never as
// markup.
"use strict";

const POLL_MS = 1000;
/** Per endpoint: the deployments the history lists (for a rollback). */
const kept = new Map();

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
    }
  }
  return node;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const json = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = json.error ? `${json.error.code}: ${json.error.message}` : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return json;
}

function deploymentText(d) {
  if (!d) return "–";
  const model = d.template && d.template.model ? ` (${d.template.model})` : "";
  return `${d.id}${model}`;
}

function secondsLeft(timestamp) {
  if (!timestamp) return null;
  const left = (Date.parse(timestamp) - Date.now()) / 1000;
  return left > 0 ? Math.ceil(left) : 0;
}

/** The candidate's share from the promotion's start to its end (or now),
 * as steps: the coordinator keeps every change (`split_history`). */
function chart(promotion) {
  const samples = (promotion.split_history || []).map((s) => [Date.parse(s.at), s.percent_traffic_to_new_version || 0]);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "history");
  svg.setAttribute("viewBox", "0 0 600 60");
  svg.setAttribute("preserveAspectRatio", "none");
  if (samples.length > 0) {
    const start = samples[0][0];
    const end = promotion.finished_at ? Date.parse(promotion.finished_at) : Date.now();
    const span = Math.max(end - start, 1);
    const x = (t) => Math.min(((t - start) / span) * 600, 600);
    const y = (p) => 58 - p * 0.56;
    const points = [];
    samples.forEach(([t, p], i) => {
      // A share holds until the next one: a step, not a slope.
      if (i > 0) points.push(`${x(t)},${y(samples[i - 1][1])}`);
      points.push(`${x(t)},${y(p)}`);
    });
    points.push(`600,${y(samples[samples.length - 1][1])}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("data-points", String(samples.length));
    svg.append(line);
  }
  return svg;
}

async function control(name, action, button) {
  if (action.startsWith("force_") && !window.confirm(`${action.replaceAll("_", " ")} for ${name}?`)) return;
  button.disabled = true;
  try {
    await api("POST", `/v1/endpoints/${encodeURIComponent(name)}/${action}`, {});
    await refresh();
  } catch (e) {
    showError(name, e);
  } finally {
    button.disabled = false;
  }
}

async function rollback(name, select) {
  if (!select.value) return;
  try {
    await api("POST", `/v1/endpoints/${encodeURIComponent(name)}/promote`, { deployment_id: select.value });
    await refresh();
  } catch (e) {
    showError(name, e);
  }
}

const errors = new Map();
function showError(name, e) {
  errors.set(name, String(e.message || e));
  draw();
}

let latest = { endpoints: [], workers: [] };

function endpointCard(e) {
  const p = e.in_progress_promotion;
  const last = e.last_promotion;
  const shown = p || last;
  const status = shown ? shown.status || "UNSPECIFIED" : null;
  const percent = shown ? shown.percent_traffic_to_new_version || 0 : 0;
  const card = el("article", { class: "endpoint", "data-endpoint": e.name });
  card.append(
    el("h2", {}, e.name,
      status ? el("span", { class: `status ${status}`, "data-field": "status" }, p ? status : `last: ${status}`) : null),
  );
  const facts = el("dl", { class: "facts" });
  const fact = (term, value, field) => facts.append(el("dt", {}, term), el("dd", field ? { "data-field": field } : {}, value));
  fact("active", deploymentText(e.active_deployment), "active");
  if (e.candidate_deployment) fact("candidate", deploymentText(e.candidate_deployment), "candidate");
  if (shown) {
    fact("promotion", `${shown.id}: ${shown.from_deployment_id || "–"} → ${shown.to_deployment_id}`);
    fact("step", `${shown.current_step || 0} of ${shown.total_steps || 0}${p && p.step_phase ? `, ${p.step_phase}` : ""}`, "step");
    const left = p ? secondsLeft(p.stabilization_ends_at) : null;
    if (left !== null) fact("stabilization", `${left} s left`, "stabilization");
    if (shown.reason) fact(p ? "waiting for" : "reason", shown.reason, "reason");
  }
  card.append(facts);
  if (shown) {
    // Widths through the CSSOM: the page's policy allows no inline style.
    const old = el("div", { class: "old" });
    old.style.width = `${100 - percent}%`;
    const candidate = el("div", { class: "new" });
    candidate.style.width = `${percent}%`;
    card.append(
      el("div", { class: "split", title: `${percent} % to ${shown.to_deployment_id}` }, old, candidate),
      el("div", {}, el("span", { "data-field": "percent" }, `${percent} %`), ` of the traffic to ${shown.to_deployment_id}`),
      el("div", { class: "muted" }, "the candidate's share since the promotion began:"),
      chart(shown),
    );
  }
  const controls = el("div", { class: "controls" });
  const actions = [
    ["pause_promotion", "Pause", p && p.status !== "PAUSED"],
    ["resume_promotion", "Resume", p && p.status === "PAUSED"],
    ["cancel_promotion", "Cancel", !!p],
    ["force_cancel_promotion", "Force cancel", !!p],
    ["force_roll_forward_promotion", "Force roll forward", !!p],
  ];
  for (const [action, label, enabled] of actions) {
    const button = el("button", { "data-action": action, disabled: !enabled, class: action.startsWith("force_") ? "danger" : "" }, label);
    button.addEventListener("click", () => control(e.name, action, button));
    controls.append(button);
  }
  const deployments = (kept.get(e.name) || []).filter(
    (d) => (!e.active_deployment || d.id !== e.active_deployment.id) && (!e.candidate_deployment || d.id !== e.candidate_deployment.id),
  );
  if (!p && deployments.length > 0) {
    const select = el("select", { "data-field": "rollback" },
      ...deployments.map((d) => el("option", { value: d.id }, `${deploymentText(d)} ${d.state || ""}`)));
    const button = el("button", { "data-action": "promote" }, "Promote");
    button.addEventListener("click", () => rollback(e.name, select));
    controls.append(el("span", {}, " an earlier deployment: "), select, button);
  }
  card.append(controls);
  if (errors.has(e.name)) card.append(el("p", { class: "error" }, errors.get(e.name)));
  if (e.replicas && e.replicas.length > 0) {
    const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Deployment"), el("th", {}, "Ready"), el("th", {}, "Starting"), el("th", {}, "Draining"))));
    const body = el("tbody");
    for (const r of e.replicas) {
      body.append(el("tr", {}, el("td", {}, r.deployment_id), el("td", {}, r.ready || 0), el("td", {}, r.starting || 0), el("td", {}, r.draining || 0)));
    }
    table.append(body);
    card.append(table);
  }
  if (e.events && e.events.length > 0) {
    const list = el("ul", { class: "events" });
    for (const event of [...e.events].reverse()) {
      list.append(el("li", {}, `${event.at ? new Date(event.at).toLocaleTimeString() : ""} ${event.kind}: ${event.message}`));
    }
    card.append(el("details", { open: true }, el("summary", {}, "Events"), list));
  }
  return card;
}

function workerRow(w) {
  const s = w.status || {};
  const gpus = s.gpus || [];
  const gpuText = gpus.length === 0 ? "–" : `${gpus.length}× ${gpus[0].name}`;
  const labels = Object.entries(s.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  const state = w.cordoned ? `cordoned${w.cordon_reason ? ` (${w.cordon_reason})` : ""}` : w.reachable ? "ready" : "unreachable";
  const engine = s.engine && s.engine.state ? s.engine.state : "–";
  const deployment = w.assigned_deployment_id ? `${w.assigned_endpoint}/${w.assigned_deployment_id}` : "–";
  return el("tr", { "data-worker": w.id },
    el("td", {}, w.id), el("td", {}, w.control_address), el("td", {}, state), el("td", {}, labels || "–"),
    el("td", {}, gpuText), el("td", {}, s.gpu_health || "–"), el("td", {}, (s.in_flight && s.in_flight.gate) || 0),
    el("td", {}, engine), el("td", {}, deployment));
}

function draw() {
  const endpoints = document.getElementById("endpoints");
  endpoints.replaceChildren(...latest.endpoints.map(endpointCard));
  if (latest.endpoints.length === 0) endpoints.append(el("p", { class: "muted" }, "No endpoint yet: `crossfade endpoint create`."));
  document.querySelector("#workers tbody").replaceChildren(...latest.workers.map(workerRow));
}

async function refresh() {
  const connection = document.getElementById("connection");
  try {
    const list = await api("GET", "/v1/endpoints");
    const names = (list.endpoints || []).map((e) => e.name);
    const [endpoints, workers] = await Promise.all([
      Promise.all(names.map((n) => api("GET", `/v1/endpoints/${encodeURIComponent(n)}?event_limit=20`))),
      api("GET", "/v1/workers"),
    ]);
    for (const e of endpoints) {
      const p = e.in_progress_promotion;
      if (!p && !kept.has(e.name)) {
        api("GET", `/v1/endpoints/${encodeURIComponent(e.name)}/history`)
          .then((h) => kept.set(e.name, h.deployments || []))
          .catch(() => {});
      }
      if (p) kept.delete(e.name);
    }
    latest = { endpoints, workers: workers.workers || [] };
    connection.textContent = `updated ${new Date().toLocaleTimeString()}`;
    connection.className = "muted";
  } catch (e) {
    connection.textContent = `coordinator unreachable: ${e.message || e}`;
    connection.className = "error";
  }
  draw();
}

refresh();
setInterval(refresh, POLL_MS);
