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

const NO_ENTRY = "\u{1F6AB}";

function show(element, text) {
  // The block messages start with 🚫: drawn from CSS where no emoji font is installed, while
  // the text itself stays exactly what the API said.
  if (text && text.startsWith(NO_ENTRY)) {
    const sign = document.createElement("span");
    sign.className = "no-entry";
    sign.textContent = NO_ENTRY;
    element.replaceChildren(sign, text.slice(NO_ENTRY.length));
  } else {
    element.textContent = text || "";
  }
  element.hidden = !text;
}

function statusText(job) {
  return job.outcome ? `${job.status} (${job.outcome})` : job.status;
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
      for (const value of [time(job.created_at), job.kind, statusText(job), job.attempts]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      return row;
    }));
    const inbox = await api("/api/me/notifications?limit=10");
    $("notifications").replaceChildren(...inbox.items.map((item) => {
      const line = document.createElement("li");
      const message = document.createElement("span");
      show(message, item.payload.message || "");
      line.append(`${time(item.created_at)} · ${item.event}: `, message);
      if (item.payload.result_url) {
        const link = document.createElement("a");
        link.href = item.payload.result_url;
        link.textContent = "result";
        link.addEventListener("click", (event) => {
          event.preventDefault();  // the image needs the token, so it is fetched rather than followed
          showResult({ id: item.job_id, result_url: item.payload.result_url });
        });
        line.append(" ", link);
      }
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
  status.textContent = statusText(job);
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

async function finish(job) {
  if (job.result_url) await showResult(job);
  signIn();
}

// Server-Sent Events from /api/jobs/{id}/events, read with fetch so that the token travels in
// a header; true when the job finished, false when the stream is not available or ended early.
async function followEvents(jobId) {
  const response = await fetch(`/api/jobs/${jobId}/events`,
    { headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" } });
  if (!response.ok || !(response.headers.get("content-type") || "").startsWith("text/event-stream")) return false;
  $("job-card").dataset.live = "events";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (watched === jobId) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      buffer = buffer.slice(end + 2);
      if (!data) continue;
      const job = JSON.parse(data);
      render(job);
      if (TERMINAL.has(job.status)) {
        reader.cancel();
        await finish(job);
        return true;
      }
    }
  }
  reader.cancel();
  return true;
}

async function poll(jobId) {
  $("job-card").dataset.live = "polling";
  while (watched === jobId) {
    const job = await api(`/api/jobs/${jobId}`);
    render(job);
    if (TERMINAL.has(job.status)) return finish(job);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function watch(jobId) {
  watched = jobId;
  try {
    if (await followEvents(jobId)) return;
  } catch (error) {
    console.warn("no event stream; polling", error);
  }
  if (watched === jobId) await poll(jobId);
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
