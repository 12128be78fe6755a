// Runbrake's small client: live timers, toasts, websocket state, push ordering, Esc to stop.
(function () {
  "use strict";

  // --- Elapsed timers: server renders the start (and end); the browser keeps them ticking.
  function fmt(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return seconds + "s";
    var m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + "m " + String(s).padStart(2, "0") + "s";
    var h = Math.floor(m / 60);
    return h + "h " + String(m % 60).padStart(2, "0") + "m";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll(".elapsed[data-since]").forEach(function (el) {
      var since = Date.parse(el.dataset.since);
      var until = el.dataset.until ? Date.parse(el.dataset.until) : now;
      if (!isNaN(since)) el.textContent = fmt((until - since) / 1000);
    });
  }
  setInterval(tick, 1000);

  // --- Toasts: from HX-Trigger {"toast": {...}} and from Django messages on page load.
  function toast(message, level) {
    var box = document.getElementById("toasts");
    if (!box) return;
    // The same message again (a form resubmitted with the same mistake) replaces the old one.
    box.querySelectorAll(".toast").forEach(function (old) {
      if (old.dataset.message === message) old.remove();
    });
    var el = document.createElement("div");
    el.dataset.message = message;
    el.className = "toast toast-" + (level || "info");
    el.setAttribute("role", level === "error" ? "alert" : "status");
    el.textContent = message;
    var close = document.createElement("button");
    close.className = "toast-close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.onclick = function () { el.remove(); };
    el.appendChild(close);
    box.appendChild(el);
    setTimeout(function () { el.remove(); }, level === "error" ? 10000 : 5000);
  }
  window.runbrakeToast = toast;
  document.addEventListener("toast", function (e) {
    toast(e.detail.message, e.detail.level);
  });
  document.addEventListener("htmx:responseError", function (e) {
    var xhr = e.detail.xhr;
    if (xhr && xhr.getResponseHeader("HX-Trigger")) return; // the server already said why
    toast("The server answered " + xhr.status + ". Nothing was changed; try again.", "error");
  });
  document.addEventListener("htmx:sendError", function () {
    toast("Runbrake could not be reached. Check your connection; nothing was changed.", "error");
  });
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    document.querySelectorAll(".toast[data-autohide]").forEach(function (el) {
      setTimeout(function () { el.remove(); }, 6000);
    });
  });

  // --- Websocket state, visible to people (a badge) and to tests (data-ws on <body>).
  document.addEventListener("htmx:wsOpen", function () { document.body.dataset.ws = "open"; });
  // The server closes a socket for good when its user logged out (4401) or lost access to
  // the team (4403): htmx does not reconnect those, and the page says why, once.
  var ENDED = {
    4401: "You are logged out, so live updates stopped. Log in again to see this page live.",
    4403: "You no longer have access to this team, so live updates stopped.",
  };
  document.addEventListener("htmx:wsClose", function (e) {
    var code = e.detail && e.detail.event && e.detail.event.code;
    if (code === 4012 && e.detail.socketWrapper) {
      // The server is shutting down (a restart, a deploy): reconnect, spread out so that
      // every open tab does not arrive at once; if it is not back yet, htmx backs off.
      document.body.dataset.ws = "reconnecting";
      setTimeout(e.detail.socketWrapper.reconnect, 250 + Math.random() * 1000);
      return;
    }
    if (ENDED[code]) {
      document.body.dataset.ws = "ended";
      showEnded(ENDED[code], code === 4401);
      return;
    }
    document.body.dataset.ws = "closed";
  });
  function showEnded(message, login) {
    if (document.getElementById("live-ended")) return;
    var bar = document.createElement("div");
    bar.id = "live-ended";
    bar.className = "live-ended";
    bar.setAttribute("role", "alert");
    bar.textContent = message + " ";
    if (login) {
      var link = document.createElement("a");
      link.href = "/accounts/login/?next=" + encodeURIComponent(location.pathname + location.search);
      link.textContent = "Log in";
      bar.appendChild(link);
    }
    var main = document.getElementById("main");
    (main || document.body).prepend(bar);
  }
  document.addEventListener("htmx:wsError", function () { document.body.dataset.ws = "closed"; });

  // --- An answer whose form was replaced while it was on its way. The push for a stop
  // usually lands before the stop's own answer and replaces the row (or status card) that
  // holds the Cancel form. htmx looks for an answer's out-of-band targets inside the
  // requesting element's tree, which is detached by then, so it would find none and drop
  // the answer. Stop forms target <body> so this event still reaches the document, and the
  // answer is swapped against the whole page instead.
  document.addEventListener("htmx:beforeSwap", function (e) {
    var detail = e.detail, elt = detail.requestConfig && detail.requestConfig.elt;
    if (!elt || !detail.shouldSwap || document.body.contains(elt)) return;
    detail.shouldSwap = false;
    htmx.swap(document.body, detail.serverResponse, { swapStyle: "none" });
  });

  // --- Push ordering: pushes can overtake each other; never let an older one win.
  function version(el) { return Number((el && el.dataset && el.dataset.version) || 0); }
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var detail = e.detail, target = detail.target, fragment = detail.fragment;
    if (!fragment || !target) return;
    var root = fragment.firstElementChild;
    if (root && root.id && root.id === target.id) {
      // A replacement: skip it if what we already show is newer.
      if (root.dataset.version && version(root) < version(target)) detail.shouldSwap = false;
      // Keep a row's bulk-stop tick across the swap.
      var ticked = target.querySelector && target.querySelector("input[name=ids]:checked");
      var box = root.querySelector && root.querySelector("input[name=ids]");
      if (ticked && box) box.checked = true;
      return;
    }
    // An insertion (a new run at the top of the list): a row we already show is replaced by
    // the newer of the two, so a replayed push can never duplicate a row.
    fragment.querySelectorAll("[id][data-version]").forEach(function (el) {
      var existing = document.getElementById(el.id);
      if (!existing) return;
      if (version(el) < version(existing)) el.remove(); else existing.remove();
    });
    target.querySelectorAll(".empty-row").forEach(function (r) { r.remove(); });
  });

  // --- Filter forms leave out what is empty: a shared link says only what it filters.
  document.addEventListener("formdata", function (e) {
    if (!e.target.hasAttribute || !e.target.hasAttribute("data-drop-empty")) return;
    var empty = [];
    e.formData.forEach(function (value, key) { if (value === "") empty.push(key); });
    empty.forEach(function (key) { e.formData.delete(key); });
  });

  // --- Buttons that close a dialog (no inline handlers: the Content-Security-Policy forbids).
  document.addEventListener("click", function (e) {
    var closer = e.target && e.target.closest && e.target.closest("[data-close]");
    if (!closer) return;
    var dialog = document.getElementById(closer.dataset.close);
    if (dialog) dialog.innerHTML = "";
  });

  // --- Esc stops the run this page shows (with a visible hint next to the button).
  document.addEventListener("keydown", function (e) {
    if (e.key !== "Escape" || e.defaultPrevented) return;
    var tag = (e.target && e.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    var page = document.querySelector("[data-run-page]");
    if (!page) return;
    var button = document.querySelector('.run-status [data-stop-run="' + page.dataset.runPage + '"]');
    if (button && !button.disabled) button.click();
  });
})();

// --- Output as it arrives (runs/live.py, "Output deltas"): the run's socket sends JSON frames
// of new text with the offsets it covers; the page adds them to the text it keeps and shows
// it. A frame that does not follow on from what the page has means something was missed: the
// page asks for the text again ({"type": "output.want"}) and shows the answer. While the run
// streams, the text is shown with the common Markdown blocks (headings, lists, code, bold,
// emphasis) built as DOM nodes from text, never parsed as HTML; the server's full rendering
// replaces it when the run ends.
(function () {
  "use strict";
  var SHOWN = 12000;        // what the server shows of a long output (live.OUTPUT_SHOWN_CHARS)
  var KEPT = 2 * SHOWN;     // the page trims back to SHOWN when it holds more than this
  var wantedAt = {};
  function want(socket, run) {
    var now = Date.now();
    if (!socket || (wantedAt[run] && now - wantedAt[run] < 1000)) return;
    wantedAt[run] = now;
    socket.send(JSON.stringify({ type: "output.want" }));
  }
  var INLINE = /(\*\*[^*\n]+\*\*|`[^`\n]+`|\*[^*\s][^*\n]*\*|_[^_\s][^_\n]*_)/g;
  function inline(parent, text) {
    var last = 0, match;
    INLINE.lastIndex = 0;
    while ((match = INLINE.exec(text))) {
      if (match.index > last) parent.appendChild(document.createTextNode(text.slice(last, match.index)));
      var token = match[0], el;
      if (token.charAt(0) === "`") { el = document.createElement("code"); el.textContent = token.slice(1, -1); }
      else if (token.slice(0, 2) === "**") { el = document.createElement("strong"); el.textContent = token.slice(2, -2); }
      else { el = document.createElement("em"); el.textContent = token.slice(1, -1); }
      parent.appendChild(el);
      last = INLINE.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }
  function render(live) {
    var out = document.createDocumentFragment(), para = null, list = null, code = null;
    live.rbRaw.split("\n").forEach(function (line) {
      var match;
      if (code) {
        if (/^\s*```/.test(line)) code = null; else code.textContent += line + "\n";
        return;
      }
      if (/^\s*```/.test(line)) {
        para = list = null;
        var pre = document.createElement("pre");
        code = pre.appendChild(document.createElement("code"));
        out.appendChild(pre);
      } else if (!line.trim()) {
        para = list = null;
      } else if ((match = /^(#{1,6})\s+(.*)$/.exec(line))) {
        para = list = null;
        var heading = out.appendChild(document.createElement("h" + match[1].length));
        inline(heading, match[2]);
      } else if ((match = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line))) {
        var tag = match[1] ? "OL" : "UL";
        para = null;
        if (!list || list.tagName !== tag) {
          list = out.appendChild(document.createElement(tag));
          if (match[1]) list.start = Number(match[1]);
        }
        inline(list.appendChild(document.createElement("li")), match[2]);
      } else {
        list = null;
        if (para) para.appendChild(document.createElement("br"));
        else para = out.appendChild(document.createElement("p"));
        inline(para, line);
      }
    });
    live.replaceChildren(out);
    live.dataset.rendered = "1";
  }
  // The text as sent, kept beside what is shown (the server renders it as plain text).
  function raw(live) {
    if (live.rbRaw === undefined) live.rbRaw = live.textContent;
    return live.rbRaw;
  }
  function renderAll(root) {
    (root || document).querySelectorAll("[data-output-live]").forEach(function (live) {
      raw(live);
      render(live);
    });
  }
  function show(section, live, text, end, cut) {
    if (text.length > KEPT) {
      text = text.slice(-SHOWN);
      var line = text.indexOf("\n");
      if (line >= 0 && line < 2000) text = text.slice(line + 1);
      cut = true;
    }
    live.rbRaw = text;
    render(live);
    live.dataset.outputEnd = String(end);
    section.dataset.outputEnd = String(end);
    var cutNote = section.querySelector(".output-cut");
    if (cutNote && cut) cutNote.hidden = false;
    var count = section.querySelector("[data-output-count]");
    if (count) count.textContent = String(end);
    var counter = section.querySelector(".output-count");
    if (counter && end > 0) counter.hidden = false;
    var waiting = section.querySelector(".output-waiting");
    if (waiting && end > 0) waiting.hidden = true;
    section.dispatchEvent(new CustomEvent("runbrake:output", { bubbles: true }));
  }
  document.addEventListener("htmx:wsBeforeMessage", function (e) {
    var message = e.detail.message;
    if (typeof message !== "string" || message.charAt(0) !== "{") return;
    e.preventDefault();  // not HTML: htmx must not swap it
    var frame;
    try { frame = JSON.parse(message); } catch (err) { return; }
    if (!frame || typeof frame.text !== "string" || typeof frame.at !== "number" || typeof frame.end !== "number") return;
    var section = document.getElementById("run-output-" + Number(frame.run));
    var live = section && section.querySelector("[data-output-live]");
    if (!live) return;  // the run ended (its final text replaced the live one) or is not shown
    var end = Number(live.dataset.outputEnd || 0);
    if (frame.type === "output.text") {
      show(section, live, frame.text, frame.end, frame.at > 0);
    } else if (frame.type === "output.append") {
      if (frame.end <= end) return;  // already shown
      if (frame.at > end) { want(e.detail.socketWrapper, frame.run); return; }
      // Offsets count characters (code points), as the server does; slice the same way.
      var text = frame.at === end ? frame.text : Array.from(frame.text).slice(end - frame.at).join("");
      show(section, live, raw(live) + text, frame.end, false);
    }
  });
  // A section re-rendered from the database (a status change) can be behind what the page
  // already shows of a running run: keep the newer text.
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var target = e.detail.target, fragment = e.detail.fragment;
    var root = fragment && fragment.firstElementChild;
    if (!target || !root || !target.classList || !target.classList.contains("run-output")) return;
    var incoming = root.querySelector("[data-output-live]");
    var current = target.querySelector("[data-output-live]");
    if (!incoming || !current) return;
    var shown = Number(current.dataset.outputEnd || 0);
    if (shown <= Number(incoming.dataset.outputEnd || 0)) return;
    incoming.textContent = raw(current);
    incoming.dataset.outputEnd = String(shown);
    root.dataset.outputEnd = String(shown);
    var count = root.querySelector("[data-output-count]");
    if (count) count.textContent = String(shown);
    ["output-count", "output-waiting", "output-cut"].forEach(function (name) {
      var from = target.querySelector("." + name), to = root.querySelector("." + name);
      if (from && to) to.hidden = from.hidden;
    });
  });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    var target = e.detail.target;
    if (target && target.id && target.id.indexOf("run-output-") === 0) renderAll(document.getElementById(target.id));
  });
  document.addEventListener("DOMContentLoaded", function () { renderAll(); });
})();

// --- The output follows its tail while the run streams, unless the reader scrolled up; then a
// "Jump to latest" button appears. Copy takes the whole text (the page shows its end).
(function () {
  "use strict";
  var following = {};  // run output id -> false once the reader scrolled away from the end
  function atEnd(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 24; }
  function settle(section) {
    var box = section.querySelector(".output-scroll");
    if (!box) return;
    var id = section.id;
    if (following[id] === undefined) following[id] = true;
    if (following[id]) box.scrollTop = box.scrollHeight;
    else if (!section.querySelector(".jump-latest") && box.dataset.followTail === "on") {
      var jump = document.createElement("button");
      jump.type = "button";
      jump.className = "btn small jump-latest";
      jump.textContent = "Jump to latest ↓";
      box.appendChild(jump);
    }
    if (box.dataset.scrollWatched) return;  // once per box: settle runs on every append
    box.dataset.scrollWatched = "1";
    box.addEventListener("scroll", function () {
      following[id] = atEnd(box);
      var jump = box.querySelector(".jump-latest");
      if (following[id] && jump) jump.remove();
    });
  }
  var kept = {};
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var target = e.detail.target;
    if (!target || !target.classList || !target.classList.contains("run-output")) return;
    var box = target.querySelector(".output-scroll");
    if (box) kept[target.id] = box.scrollTop;
  });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    var target = e.detail.target;
    if (!target || !target.id || target.id.indexOf("run-output-") !== 0) return;
    var section = document.getElementById(target.id);
    if (!section) return;
    var box = section.querySelector(".output-scroll");
    if (box && following[target.id] === false && kept[target.id] !== undefined) {
      box.scrollTop = kept[target.id];
    }
    settle(section);
  });
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".run-output").forEach(settle);
  });
  // New text appended (the block above): keep following the tail.
  document.addEventListener("runbrake:output", function (e) { settle(e.target); });
  document.addEventListener("click", function (e) {
    var el = e.target;
    if (el && el.classList && el.classList.contains("jump-latest")) {
      var box = el.closest(".output-scroll");
      var section = el.closest(".run-output");
      following[section.id] = true;
      el.remove();
      box.scrollTop = box.scrollHeight;
      return;
    }
    var copy = el && el.closest && el.closest("[data-copy-url]");
    if (!copy) return;
    fetch(copy.dataset.copyUrl, { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (text) { return navigator.clipboard.writeText(text).then(function () { return text; }); })
      .then(function (text) { window.runbrakeToast("Copied the whole output (" + text.length.toLocaleString() + " characters).", "success"); })
      .catch(function () { window.runbrakeToast("Could not copy: use Download instead.", "error"); });
  });
})();

// --- Times: relative on the page ("3 min ago"), exact on hover (with the time zone).
(function () {
  "use strict";
  function ago(ms) {
    var s = Math.round(ms / 1000);
    if (s < 45) return "just now";
    var m = Math.round(s / 60);
    if (m < 60) return m + " min ago";
    var h = Math.round(m / 60);
    if (h < 24) return h + " h ago";
    return Math.round(h / 24) + " d ago";
  }
  function refresh() {
    document.querySelectorAll("time[data-relative]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(at)) el.textContent = ago(Date.now() - at);
    });
  }
  setInterval(refresh, 30000);
  document.addEventListener("DOMContentLoaded", refresh);
  document.addEventListener("htmx:afterSettle", refresh);
  document.addEventListener("htmx:oobAfterSwap", refresh);
})();

// --- The tab says how many of my runs are running (the list) or how this run stands (its
// page); opt-in notifications when one of my runs ends or its stop stays unconfirmed.
(function () {
  "use strict";
  var base = document.title;
  var ACTIVE = { pending: 1, running: 1, stopping: 1, stop_unconfirmed: 1 };
  var NOTIFY = { completed: "completed", failed: "failed", stopped: "stopped", stop_unconfirmed: "has a stop the provider has not confirmed" };
  var seen = {};
  function mine(el) { return el.dataset.owner && el.dataset.owner === document.body.dataset.user; }
  function retitle() {
    var page = document.querySelector("[data-run-page]");
    if (page) {
      var card = document.querySelector(".run-status[data-status]");
      if (card) document.title = card.dataset.label + " · " + base;
      return;
    }
    var n = 0;
    document.querySelectorAll("tr[data-status]").forEach(function (row) {
      if (mine(row) && ACTIVE[row.dataset.status]) n += 1;
    });
    document.title = (n ? "(" + n + " running) " : "") + base;
  }
  var loaded = false, stoppedHere = {};
  var TERMINAL = { completed: 1, failed: 1, stopped: 1, stop_unconfirmed: 1 };
  // A stop this tab was told is "waiting for the provider to confirm": its outcome is said
  // when the provider gives it (an answer that already said the outcome is not repeated).
  document.addEventListener("toast", function (e) {
    var m = /^Stopping run #(\d+); waiting/.exec((e.detail && e.detail.message) || "");
    if (m) stoppedHere[m[1]] = true;
  });
  function bump(status, by) {
    var count = document.querySelector('[data-count-status="' + status + '"] strong');
    if (!count || /\+$/.test(count.textContent)) return;  // "1,000+" stays as it is
    var n = Number(count.textContent.replace(/[^0-9]/g, "")) + by;
    count.textContent = Math.max(0, n).toLocaleString();
  }
  function notice(el) {
    var id = el.id.replace(/^run-(row|status)-/, "");
    var before = seen[id];
    seen[id] = el.dataset.status;
    if (loaded && el.tagName === "TR" && before !== el.dataset.status) {
      // The list's counts follow the rows it shows.
      if (before) bump(before, -1); else bump("all", 1);
      bump(el.dataset.status, 1);
    }
    if (!before || before === el.dataset.status) return;
    // A bulk-stop report on the page follows its runs to their outcome.
    document.querySelectorAll('[data-report-run="' + id + '"] .outcome').forEach(function (cell) {
      cell.textContent = el.dataset.label;
      cell.className = "outcome outcome-" + el.dataset.status;
    });
    if (stoppedHere[id] && TERMINAL[el.dataset.status]) {
      delete stoppedHere[id];
      window.runbrakeToast("Run #" + id + ": " + el.dataset.label + ".", el.dataset.status === "stopped" ? "success" : "info");
    }
    // Status changes are said to screen readers (the swapped fragment itself is not).
    var announcer = document.getElementById("announcer");
    if (announcer) announcer.textContent = "Run #" + id + ": " + el.dataset.label;
    if (!mine(el)) return;
    var what = NOTIFY[el.dataset.status];
    if (!what || localStorage.getItem("runbrake-notify") !== "on") return;
    if (!("Notification" in window) || Notification.permission !== "granted") return;
    new Notification("Run #" + id + " " + what, { body: "Runbrake", tag: "run-" + id });
  }
  function scan() {
    document.querySelectorAll("tr[data-status][id^='run-row-'], .run-status[data-status]").forEach(notice);
    retitle();
    loaded = true;
  }
  document.addEventListener("DOMContentLoaded", function () {
    scan();
    var toggle = document.querySelector(".notify-toggle");
    if (!toggle || !("Notification" in window)) return;
    toggle.hidden = false;
    function show() {
      var on = localStorage.getItem("runbrake-notify") === "on" && Notification.permission === "granted";
      toggle.setAttribute("aria-pressed", on ? "true" : "false");
      toggle.textContent = on ? "Notifications on" : "Notify me";
      toggle.title = on ? "Turn off notifications" : "Get a notification when one of your runs ends";
    }
    show();
    toggle.addEventListener("click", function () {
      if (localStorage.getItem("runbrake-notify") === "on") {
        localStorage.removeItem("runbrake-notify");
        show();
        return;
      }
      Notification.requestPermission().then(function (answer) {
        if (answer === "granted") localStorage.setItem("runbrake-notify", "on");
        else window.runbrakeToast("Notifications are blocked for this site in the browser.", "error");
        show();
      });
    });
  });
  document.addEventListener("htmx:oobAfterSwap", scan);
  document.addEventListener("htmx:afterSettle", scan);
})();

// --- The prompt's length against its limit, as it is typed or pasted (never cut).
(function () {
  "use strict";
  function count(area) {
    var out = document.getElementById(area.getAttribute("aria-describedby"));
    var limit = Number(area.dataset.limit || 0);
    if (!out || !limit) return;
    var n = area.value.length;
    out.textContent = n.toLocaleString() + " of " + limit.toLocaleString() + " characters" +
      (n > limit ? " — " + (n - limit).toLocaleString() + " too many: shorten it to launch" : "");
    out.classList.toggle("over", n > limit);
  }
  document.addEventListener("input", function (e) {
    if (e.target && e.target.dataset && e.target.dataset.limit) count(e.target);
  });
  document.addEventListener("htmx:load", function (e) {
    var root = e.detail.elt;
    (root.querySelectorAll ? root.querySelectorAll("textarea[data-limit]") : []).forEach(count);
  });
})();

// --- The launch form shows only the selected provider's options.
(function () {
  "use strict";
  function sync(form) {
    var select = form.querySelector("select[name=provider_account]");
    if (!select) return;
    var kinds = JSON.parse(form.dataset.accountKinds || "{}");
    var kind = kinds[select.value] || "";
    form.querySelectorAll("fieldset.provider-options").forEach(function (set) {
      set.hidden = set.dataset.kind !== kind;
    });
  }
  document.addEventListener("change", function (e) {
    if (e.target && e.target.name === "provider_account" && e.target.form) sync(e.target.form);
  });
  document.addEventListener("htmx:load", function (e) {
    var form = e.detail.elt.id === "launch-form" ? e.detail.elt : e.detail.elt.querySelector && e.detail.elt.querySelector("#launch-form");
    if (form) sync(form);
  });
})();
