// The live cluster page: polls /cluster and draws one card per member. No build step.
"use strict";

const key = new URLSearchParams(location.hash.slice(1)).get("key");
const headers = key ? { "X-API-Key": key } : {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function mb(value) {
  return value == null ? "-" : `${Math.round(value).toLocaleString()} MiB`;
}

function deviceBar(d) {
  const total = d.total_mb || 1;
  const used = el("div", { class: "used", style: `width:${Math.min(100, 100 * d.used_mb / total)}%` });
  const claimed = el("div", { class: "claimed", style: `width:${Math.min(100, 100 * d.claimed_mb / total)}%` });
  return el("div", { class: "device" },
    el("div", { class: "label" },
      el("span", {}, d.name),
      el("span", {}, `claimed ${mb(d.claimed_mb)} · in use ${mb(d.used_mb)} / ${mb(d.total_mb)}`)),
    el("div", { class: "bar", title: "top: memory in use (measured, or held back), bottom: claims" }, used, claimed));
}

function modelTable(models) {
  const table = el("table", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, "state"),
    el("th", {}, "queue")));
  for (const m of models) {
    table.append(el("tr", { class: "model" }, el("td", {}, m.name), el("td", {}, m.state),
      el("td", {}, String(m.queued ?? 0))));
  }
  return table;
}

function memberCard(m, primary) {
  const badges = el("span");
  if (primary && primary.name === m.name) badges.append(el("span", { class: "badge primary" }, `primary · term ${primary.term}`));
  badges.append(" ", el("span", { class: "badge" }, `${m.state} · inc ${m.incarnation ?? 0}`));
  const card = el("section", { class: `member ${m.state}`, "data-name": m.name },
    el("h2", {}, el("span", {}, m.name), badges));
  for (const d of m.devices || []) card.append(deviceBar(d));
  card.append(modelTable(m.models || []));
  return card;
}

async function refresh() {
  const summary = document.getElementById("summary");
  try {
    const response = await fetch("/cluster", { headers });
    const view = await response.json();
    if (!response.ok) throw new Error(view.error?.message || view.error || response.statusText);
    const main = document.getElementById("members");
    main.replaceChildren(...view.members.map((m) => memberCard(m, view.primary)));
    const suspects = view.members.filter((m) => m.state === "suspect").map((m) => m.name);
    summary.textContent = `${view.members.length} member(s) · ` +
      (view.primary ? `primary ${view.primary.name} (term ${view.primary.term})` : "no primary") +
      (view.enabled ? "" : " · single node (no cluster configured)") +
      (suspects.length ? ` · suspected: ${suspects.join(", ")}` : "");
    summary.classList.remove("error");
    document.body.dataset.members = String(view.members.length);
  } catch (err) {
    summary.textContent = `cannot read /cluster: ${err.message}`;
    summary.classList.add("error");
  }
}

refresh();
setInterval(refresh, 1000);
