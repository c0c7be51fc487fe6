() => {
  // A click on a panel of the head grid picks that head: plotly reports the clicked trace, whose
  // meta holds {layer, head}, and the matching choice of the "Pick a head" radio is clicked.
  const attach = () => {
    document.querySelectorAll("#head-grid .js-plotly-plot").forEach((plot) => {
      if (plot.__llamavizClick || typeof plot.on !== "function") return;
      plot.__llamavizClick = true;
      plot.on("plotly_click", (event) => {
        const point = event && event.points && event.points[0];
        const meta = point && point.data && point.data.meta;
        if (!meta || meta.head === undefined) return;
        const choice = document.querySelector(`#head-picker input[value="H${meta.head}"]`);
        if (choice) choice.click();
      });
    });
  };
  new MutationObserver(attach).observe(document.body, { childList: true, subtree: true });
  attach();
  // A click on a token of the text view makes it the picked position (the number box redraws the view).
  document.addEventListener("click", (event) => {
    const token = event.target.closest && event.target.closest("#attention-text span[data-pos]");
    const box = document.querySelector("#text-position input");
    if (!token || !box) return;
    box.value = token.dataset.pos;
    box.dispatchEvent(new Event("input", { bubbles: true }));
    box.dispatchEvent(new Event("change", { bubbles: true }));
  });

  // The workbench: a click on a token (Tokens tab) or an attention row picks the token to explain, and a
  // click on a node or edge of the flow graph shows what it writes. Each click is sent through a hidden
  // textbox ("what:when", so the same click twice is still a change) whose input event runs the handler.
  const send = (id, text) => {
    const box = document.querySelector(`#${id} textarea, #${id} input`);
    if (!box) return;
    const setter = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(box), "value").set;
    setter.call(box, `${text}:${Date.now()}`);
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };
  document.addEventListener("click", (event) => {
    const token = event.target.closest && event.target.closest("#tokens-view .llamaviz-token");
    if (!token) return;
    const all = Array.from(document.querySelectorAll("#tokens-view .llamaviz-token"));
    send("explain-click", all.indexOf(token));
  });
  const attachWorkbench = () => {
    document.querySelectorAll("#attention-plot .js-plotly-plot, #flow-graph .js-plotly-plot").forEach((plot) => {
      if (plot.__llamavizWorkbench || typeof plot.on !== "function") return;
      plot.__llamavizWorkbench = true;
      const flow = !!plot.closest("#flow-graph");
      plot.on("plotly_click", (event) => {
        const point = event && event.points && event.points[0];
        if (!point) return;
        if (!flow) {  // an attention row: its label is "i: token"
          const row = parseInt(String(point.y), 10);
          if (!Number.isNaN(row)) send("explain-click", row);
        } else if (Array.isArray(point.customdata)) {
          send("flow-click", `node:${point.customdata[0]}:${point.customdata[1]}`);
        } else if (point.customdata !== undefined) {
          send("flow-click", `edge:${point.customdata}`);
        }
      });
    });
  };
  new MutationObserver(attachWorkbench).observe(document.body, { childList: true, subtree: true });
  attachWorkbench();
}
