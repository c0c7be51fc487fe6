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
}
