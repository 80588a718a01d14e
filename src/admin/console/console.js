// portals-crm console: search filters, the mapping editor's live validation, preview, test
// and save. Values from the org or the file are only ever set as text (textContent, value).
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function postJson(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try { data = await response.json(); } catch (_) { data = { error: response.statusText }; }
  return { status: response.status, data };
}

function setupFilters() {
  document.querySelectorAll("input[data-filter]").forEach((input) => {
    const table = document.getElementById(input.dataset.filter);
    input.addEventListener("input", () => {
      const needle = input.value.toLowerCase();
      table.querySelectorAll("tbody tr").forEach((row) => {
        row.hidden = needle !== "" && !row.textContent.toLowerCase().includes(needle);
      });
    });
  });
}

function setupEditor() {
  const editor = document.getElementById("editor");
  if (!editor) return;
  const tenant = editor.dataset.tenant;
  const base = "/admin/tenants/" + encodeURIComponent(tenant);
  const records = document.getElementById("records");
  const status = document.getElementById("status");
  let valid = false;

  function model() {
    return {
      records: Array.from(records.querySelectorAll("[data-record]")).map((section) => {
        const get = (name) => section.querySelector("[name=" + name + "]").value.trim();
        return {
          ref: get("ref"), sobject: get("sobject"), for_each: get("for_each"), when: get("when"),
          action: get("action"), external_id_field: get("external_id_field"), external_id: get("external_id"),
          fields: Array.from(section.querySelectorAll("[data-row]")).map((row) => ({
            name: row.querySelector("[name=field]").value.trim(),
            kind: row.querySelector("[name=kind]").value,
            value: row.querySelector("[name=value]").value,
          })).filter((f) => f.name !== ""),
        };
      }),
    };
  }

  async function fieldList(section) {
    const sobject = section.querySelector("[name=sobject]").value.trim();
    const id = "fields-" + sobject;
    if (sobject && !document.getElementById(id)) {
      const list = el("datalist");
      list.id = id;
      document.body.appendChild(list);
      const response = await fetch(base + "/sobjects/" + encodeURIComponent(sobject) + "/fields", { credentials: "same-origin" });
      if (response.ok) {
        (await response.json()).filter((f) => f.createable || f.updateable).forEach((f) => {
          const option = el("option", f.label + " (" + f.type + ")");
          option.value = f.name;
          list.appendChild(option);
        });
      }
    }
    section.querySelectorAll("[data-fields]").forEach((input) => input.setAttribute("list", id));
    section.querySelector(".record-title").textContent =
      (section.querySelector("[name=ref]").value || "new record") + " → " + (sobject || "?");
  }

  function show(problems) {
    records.querySelectorAll("[data-problem]").forEach((cell) => { cell.textContent = ""; });
    records.querySelectorAll("[data-record-problems]").forEach((list) => { list.textContent = ""; });
    const sections = Array.from(records.querySelectorAll("[data-record]"));
    problems.forEach((p) => {
      const section = sections.find((s) => s.querySelector("[name=ref]").value.trim() === p.record) || sections[0];
      if (!section) return;
      const row = Array.from(section.querySelectorAll("[data-row]"))
        .find((r) => p.field && r.querySelector("[name=field]").value.trim().toLowerCase() === p.field.toLowerCase());
      const text = el("span", p.target + ": " + p.problem);
      const fix = el("span", "Fix: " + p.fix, "fix");
      if (row) {
        const cell = row.querySelector("[data-problem]");
        cell.appendChild(text); cell.appendChild(fix);
      } else {
        const item = el("li"); item.appendChild(text); item.appendChild(fix);
        section.querySelector("[data-record-problems]").appendChild(item);
      }
    });
  }

  let pending = null;
  async function validate() {
    status.textContent = "Checking…";
    const { status: code, data } = await postJson(base + "/validate", model());
    if (code !== 200) {
      valid = false;
      status.textContent = "Not checked: " + (data.error || code);
      status.className = "status bad";
      return;
    }
    valid = data.valid;
    show(data.problems);
    status.textContent = data.valid ? "Valid against the org." : data.problems.length + " problem(s) to fix before saving.";
    status.className = "status " + (data.valid ? "good" : "bad");
  }
  // An edit makes the reviewed diff stale: Save waits for the next review.
  function soon() {
    document.getElementById("save").disabled = true;
    clearTimeout(pending);
    pending = setTimeout(validate, 400);
  }

  function refreshRefs() {
    const sections = Array.from(records.querySelectorAll("[data-record]"));
    sections.forEach((section, index) => {
      const earlier = sections.slice(0, index).map((s) => {
        const ref = s.querySelector("[name=ref]").value.trim();
        return s.querySelector("[name=for_each]").value === "attendees" ? ref + "_0" : ref;
      }).filter((r) => r !== "");
      section.querySelectorAll("[data-refs]").forEach((select) => {
        select.length = 1;
        earlier.forEach((ref) => {
          const option = el("option", "@{" + ref + ".id}");
          option.value = "@{" + ref + ".id}";
          select.appendChild(option);
        });
      });
    });
  }

  records.addEventListener("input", soon);
  records.addEventListener("change", (event) => {
    const target = event.target;
    const section = target.closest("[data-record]");
    if (target.matches("[data-refs]") && target.value) {
      const row = target.closest("[data-row]");
      row.querySelector("[name=value]").value = target.value;
      row.querySelector("[name=kind]").value = "text";
      target.value = "";
    }
    if (target.name === "sobject" || target.name === "ref") fieldList(section);
    refreshRefs();
    soon();
  });
  editor.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-act]");
    if (!button) return;
    const section = button.closest("[data-record]");
    const row = button.closest("[data-row]");
    switch (button.dataset.act) {
      case "record-add": {
        const fresh = document.getElementById("record-template").content.firstElementChild.cloneNode(true);
        records.appendChild(fresh);
        fresh.querySelector("[name=ref]").focus();
        break;
      }
      case "record-remove": section.remove(); break;
      case "record-up": if (section.previousElementSibling) section.parentNode.insertBefore(section, section.previousElementSibling); break;
      case "record-down": if (section.nextElementSibling) section.parentNode.insertBefore(section.nextElementSibling, section); break;
      case "row-add": {
        const fresh = document.getElementById("row-template").content.querySelector("tr").cloneNode(true);
        section.querySelector("tbody").appendChild(fresh);
        fieldList(section);
        fresh.querySelector("[name=field]").focus();
        break;
      }
      case "row-remove": row.remove(); break;
      case "row-up": if (row.previousElementSibling) row.parentNode.insertBefore(row, row.previousElementSibling); break;
      case "row-down": if (row.nextElementSibling) row.parentNode.insertBefore(row.nextElementSibling, row); break;
    }
    button.focus();
    refreshRefs();
    soon();
  });

  // A recent dead letter's body when one is chosen, else the sample, else the pasted event.
  function chosenEvent() {
    const letter = document.getElementById("dead-letter");
    if (letter && letter.value) return { dead_letter: letter.value };
    const sample = document.getElementById("sample").value;
    const pasted = document.getElementById("pasted").value;
    return sample ? { sample } : { event: pasted };
  }

  document.getElementById("preview").addEventListener("click", async () => {
    const out = document.getElementById("preview-out");
    out.textContent = "Rendering…";
    const { status: code, data } = await postJson(base + "/preview", Object.assign({ mapping: model() }, chosenEvent()));
    out.textContent = "";
    if (data.source) out.appendChild(el("p", "Event: " + data.source, "hint"));
    if (code !== 200) {
      out.appendChild(el("p", "No preview: " + (data.error || (data.problems || []).map((p) => p.target + ": " + p.problem).join("; ")), "bad"));
      return;
    }
    data.records.forEach((record) => {
      out.appendChild(el("h3", record.reference_id + " — " + record.method + " " + record.sobject));
      out.appendChild(el("p", record.url, "hint"));
      const table = el("table", null, "preview-table");
      const head = el("tr");
      ["Field", "Rendered value", "Field type", "Fits"].forEach((h) => { const th = el("th", h); th.scope = "col"; head.appendChild(th); });
      table.appendChild(head);
      record.fields.forEach((f) => {
        const tr = el("tr");
        tr.appendChild(el("td", f.field));
        tr.appendChild(el("td", JSON.stringify(f.value), "value"));
        tr.appendChild(el("td", f.type ? f.type + (f.length ? " (" + f.length + ")" : "") : "not visible"));
        tr.appendChild(el("td", f.fits ? "✓ fits" : "✗ does not fit: " + f.why, f.fits ? "good" : "bad"));
        table.appendChild(tr);
      });
      out.appendChild(table);
    });
  });

  document.getElementById("probe").addEventListener("click", async () => {
    const result = document.getElementById("probe-result");
    result.textContent = "Testing against the org (rolled back, nothing written)…";
    const sample = document.getElementById("sample").value || "booked";
    const { status: code, data } = await postJson(base + "/probe", { mapping: model(), sample });
    if (code !== 200) {
      result.textContent = "Not tested: " + (data.error || (data.problems || []).map((p) => p.target + ": " + p.problem).join("; "));
      result.className = "bad";
      return;
    }
    result.textContent = (data.ok ? "✓ " : "✗ ") + data.detail + (data.fix ? " — Fix: " + data.fix : "");
    result.className = data.ok ? "good" : "bad";
  });

  document.getElementById("review").addEventListener("click", async () => {
    const result = document.getElementById("save-result");
    const diff = document.getElementById("diff");
    const { status: code, data } = await postJson(base + "/diff", { mapping: model() });
    diff.textContent = "";
    if (code !== 200) { result.textContent = "Cannot review: " + data.error; result.className = "bad"; return; }
    const changed = data.diff.filter((line) => line[0] !== " ");
    data.diff.forEach((line) => {
      if (line[0] === " ") return;
      diff.appendChild(el("span", line + "\n", line[0] === "+" ? "add" : "del"));
    });
    show(data.problems);
    if (!data.valid) {
      result.textContent = "This mapping has problems; it cannot be saved until they are fixed.";
      result.className = "bad";
    } else {
      result.textContent = changed.length ? changed.length + " changed line(s), proposed vs running. Save to put them live." : "No change from the running file.";
      result.className = "";
    }
    document.getElementById("save").disabled = !data.valid || changed.length === 0;
  });

  document.getElementById("save").addEventListener("click", async () => {
    const result = document.getElementById("save-result");
    const { status: code, data } = await postJson(base + "/mapping", { mapping: model() });
    document.getElementById("save").disabled = true;
    if (code === 200) {
      result.textContent = "Saved (previous version kept as .bak) and reloaded: " + data.reloaded.join(", ") + " now run the new mapping.";
      result.className = "good";
      document.getElementById("diff").textContent = "";
      return;
    }
    if (data.read_only) {
      result.textContent = data.why + " ";
      const link = el("a", "Download " + tenant + ".toml");
      link.href = URL.createObjectURL(new Blob([data.file], { type: "application/toml" }));
      link.download = tenant + ".toml";
      result.appendChild(link);
    } else if (data.problems) {
      show(data.problems);
      result.textContent = "Not saved: the mapping has problems.";
    } else if (data.reload_problems) {
      result.textContent = "Saved, but the reload was refused (the running tenants stay): " + data.reload_problems.join("; ");
    } else {
      result.textContent = "Not saved: " + data.error;
    }
    result.className = "bad";
  });

  records.querySelectorAll("[data-record]").forEach(fieldList);
  refreshRefs();
  validate();
}

// Dead letters: replay (the server re-checks each cause first), export and purge of the
// selection. Results are written as text only.
function setupDeadLetters() {
  const result = document.getElementById("dlq-result");
  if (!result) return;
  const override = document.getElementById("override");
  const selected = () =>
    Array.from(document.querySelectorAll("input[name=pick]:checked")).map((box) => box.value);
  // Letters that share an id are replayed, exported and purged together (the routes select by
  // id): ticking one ticks the others, so that the selection and "purge N" count what goes.
  const picks = Array.from(document.querySelectorAll("input[name=pick]"));
  picks.forEach((box) => box.addEventListener("change", () => {
    picks.forEach((other) => { if (other.value === box.value) other.checked = box.checked; });
  }));

  function say(lines, cls) {
    result.replaceChildren(...lines.map((line) => el("p", line)));
    result.className = cls || "";
  }

  async function replay(ids) {
    if (ids.length === 0) { say(["Select dead letters first."], "bad"); return; }
    say(["Re-checking the cause and replaying " + ids.length + "…"]);
    const { status, data } = await postJson("/admin/dead-letters/replay",
      { ids, override: Boolean(override && override.checked) });
    if (status !== 200) { say(["Replay failed: " + (data.error || status)], "bad"); return; }
    const lines = [];
    if (data.replayed.length) {
      lines.push("Replayed " + data.replayed.length + " (confirmed by the broker, removed from the dead letters): " + data.replayed.join(", "));
    }
    if (data.unchecked.length) {
      lines.push("Replayed without a re-check (their cause cannot be checked against the org): " + data.unchecked.join(", "));
    }
    if (data.superseded.length) {
      lines.push("Already superseded by a newer version, so they change nothing: " + data.superseded.join(", "));
    }
    data.blocked.forEach((b) => {
      lines.push("Blocked " + b.id + ": " + b.detail + b.problems.map((p) => " — " + p.target + ": " + p.problem + ". Fix: " + p.fix).join(""));
    });
    if (data.missing.length) lines.push("No longer in the queue: " + data.missing.join(", "));
    say(lines.length ? lines : ["Nothing to replay."], data.blocked.length ? "bad" : "good");
  }

  document.querySelectorAll("[data-replay]").forEach((button) => {
    // A JSON array of ids: an event id may hold a comma.
    button.addEventListener("click", () => replay(JSON.parse(button.dataset.replay)));
  });
  const replaySelected = document.getElementById("replay-selected");
  if (replaySelected) replaySelected.addEventListener("click", () => replay(selected()));

  const exportSelected = document.getElementById("export-selected");
  if (exportSelected) {
    exportSelected.addEventListener("click", () => {
      const ids = selected();
      if (ids.length === 0) { say(["Select dead letters first."], "bad"); return; }
      // One id= each, whole: an event id may hold the comma that ids= splits at.
      window.location.assign("/admin/dead-letters/export?" + ids.map((id) => "id=" + encodeURIComponent(id)).join("&"));
    });
  }

  const purge = document.getElementById("purge-selected");
  if (purge) {
    purge.addEventListener("click", async () => {
      const ids = selected();
      if (ids.length === 0) { say(["Select dead letters first."], "bad"); return; }
      const confirm = document.getElementById("purge-confirm").value;
      const { status, data } = await postJson("/admin/dead-letters/purge", { ids, confirm });
      if (status !== 200) { say(["Not purged: " + (data.error || status)], "bad"); return; }
      const lines = ["Purged " + data.purged.length + ": " + data.purged.join(", ")];
      if (data.missing.length) lines.push("Not found (gone meanwhile): " + data.missing.join(", "));
      say(lines, data.missing.length ? "bad" : "good");
    });
  }
}

// Tenant health: polls the JSON twin every 5 s and rewrites the cells as text.
function setupHealth() {
  const at = document.getElementById("health-at");
  if (!at) return;
  const num = (v, digits, unit) => (v === null || v === undefined) ? null : v.toFixed(digits) + (unit || "");
  // Past the histogram's last bucket a quantile is only known to be at least that bound.
  const lag = (t, v) => {
    if (v === null || v === undefined) return "—";
    if (t.lag_beyond_secs !== null && v >= t.lag_beyond_secs) return "≥ " + v + " s";
    return v.toFixed(3) + " s";
  };
  const tenantCells = {
    written_per_min: (t) => num(t.written_per_min, 1) || "sampling…",
    retried_per_min: (t) => num(t.retried_per_min, 1) || "sampling…",
    dead_lettered_per_min: (t) => num(t.dead_lettered_per_min, 1) || "sampling…",
    lag_p50_secs: (t) => lag(t, t.lag_p50_secs),
    lag_p99_secs: (t) => lag(t, t.lag_p99_secs),
    circuit: (t) => t.circuit
      + (t.next_probe_in_secs !== null ? ", next probe in " + Math.round(t.next_probe_in_secs) + " s" : "")
      + (t.sign_in_refused ? " (" + t.sign_in_refused + ")" : ""),
    api_used: (t) => t.api_used !== null ? (t.api_used * 100).toFixed(1) + " %" : "not reported yet",
    last_write_seen: (t) => t.last_write_seen || "none since start",
  };
  async function refresh() {
    try {
      const response = await fetch(at.dataset.health, { credentials: "same-origin" });
      if (!response.ok) { at.textContent = "Refresh failed: HTTP " + response.status; return; }
      const health = await response.json();
      health.tenants.forEach((t) => {
        const row = Array.from(document.querySelectorAll("#tenant-health tr[data-tenant]"))
          .find((r) => r.dataset.tenant === t.tenant);
        if (!row) return;
        Object.entries(tenantCells).forEach(([key, show]) => {
          const cell = row.querySelector("[data-k=" + key + "]");
          if (cell) cell.textContent = show(t);
        });
      });
      health.queues.forEach((q) => {
        const row = Array.from(document.querySelectorAll("#queues tr[data-queue]"))
          .find((r) => r.dataset.queue === q.queue);
        if (!row) return;
        row.querySelector("[data-k=messages]").textContent = q.messages !== null ? String(q.messages) : q.error;
        row.querySelector("[data-k=consumers]").textContent = q.consumers !== null ? String(q.consumers) : "—";
      });
      at.textContent = "Read at " + health.at;
    } catch (e) {
      at.textContent = "Refresh failed: " + e;
    }
  }
  setInterval(refresh, 5000);
}

// The tenants overview: re-check one tenant against its org now, then show the new reading.
function setupRecheck() {
  document.querySelectorAll("[data-recheck]").forEach((button) => {
    button.addEventListener("click", async () => {
      const result = button.parentNode.querySelector("[data-recheck-result]");
      result.textContent = "Checking against the org…";
      button.disabled = true;
      const { status, data } = await postJson("/admin/tenants/" + encodeURIComponent(button.dataset.recheck) + "/recheck", {});
      if (status !== 200) {
        result.textContent = "Not checked: " + data.error;
        button.disabled = false;
        return;
      }
      window.location.reload();
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupFilters();
  setupRecheck();
  setupEditor();
  setupDeadLetters();
  setupHealth();
});
