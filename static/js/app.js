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
