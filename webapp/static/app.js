// renderq's page: talks to the JSON API with the token kept in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "failed", "canceled"]);
let token = localStorage.getItem("renderq.token") || "";
let me = null;
let watched = null;

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: "Bearer " + token } });
  if (response.headers.get("content-type")?.includes("json")) {
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    return body;
  }
  if (!response.ok) throw new Error(response.statusText);
  return response;
}

function show(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "—";
}

async function signIn() {
  $("token").value = token;
  if (!token) return;
  try {
    me = await api("/api/me");
    $("account").textContent = `${me.email} · ${me.available} of ${me.balance} credits available`;
    refreshLists();
  } catch (error) {
    $("account").textContent = "token refused: " + error.message;
  }
}

async function refreshLists() {
  if (!me) return;
  try {
    const jobs = await api(`/api/users/${me.id}/jobs?limit=10`);
    $("jobs").replaceChildren(...jobs.items.map((job) => {
      const row = document.createElement("tr");
      for (const value of [time(job.created_at), job.kind, job.status, job.attempts]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      return row;
    }));
    const inbox = await api("/api/me/notifications?limit=10");
    $("notifications").replaceChildren(...inbox.items.map((item) => {
      const line = document.createElement("li");
      line.textContent = `${time(item.created_at)} · ${item.event}: ${item.payload.message || item.payload.result_url || ""}`;
      return line;
    }));
  } catch (error) {
    console.warn("lists not refreshed", error);
  }
}

function render(job) {
  $("job-card").hidden = false;
  $("job-id").textContent = job.id;
  const status = $("job-status");
  status.textContent = job.outcome ? `${job.status} (${job.outcome})` : job.status;
  status.className = "status " + job.status + (job.outcome === "blocked" ? " blocked" : "");
  $("job-attempts").textContent = job.retry_count ? `${job.attempts} (background tries: ${job.retry_count})` : job.attempts;
  $("job-next-retry").textContent = job.next_retry_at ? time(job.next_retry_at) : "—";
  show($("job-message"), job.message);
  show($("job-error"), job.error ? job.error.message : "");
}

async function showResult(job) {
  const image = await (await api(job.result_url)).blob();
  $("job-result").src = URL.createObjectURL(image);
  $("job-result").hidden = false;
}

async function watch(jobId) {
  watched = jobId;
  while (watched === jobId) {
    const job = await api(`/api/jobs/${jobId}`);
    render(job);
    if (TERMINAL.has(job.status)) {
      if (job.result_url) await showResult(job);
      signIn();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  localStorage.setItem("renderq.token", token);
  signIn();
});

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  show($("form-error"), "");
  $("job-result").hidden = true;
  const form = new FormData();
  form.append("file", $("file").files[0]);
  form.append("style", $("style").value);
  form.append("prompt", $("prompt").value);
  try {
    const job = await api("/api/photos", { method: "POST", body: form });
    render(job);
    refreshLists();
    watch(job.id);
  } catch (error) {
    show($("form-error"), error.message);
  }
});

signIn();
