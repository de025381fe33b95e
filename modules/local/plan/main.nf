/*
 * PLAN: one slide in, its tissue tiles out (tile table, slide facts, tissue QC picture).
 * Runs once per slide on the CPU; reads only a low-resolution level of the slide. The
 * calibration (optional: an empty list) is CALIBRATE's threshold shared by the slides of this
 * slide's modality. An unset pixel size or modality renders as null, which bmseg reads as
 * "from the slide's metadata"; an empty calibration leaves --calibration alone (per-slide Otsu).
 */
process PLAN {
    tag "${meta.id}"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    tuple val(meta), path(slide), path(calibration)

    output:
    tuple val(meta), path("${meta.id}.tiles.parquet"), emit: tiles
    tuple val(meta), path("${meta.id}.slide.json"), emit: plan
    tuple val(meta), path("${meta.id}.tissue.png"), emit: tissue
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress plan ${slide} --slide-id ${meta.id} --pixel-size-um ${meta.pixel_size_um} --modality ${meta.modality} --calibration ${calibration} ${args} --out .

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    touch ${meta.id}.tiles.parquet ${meta.id}.slide.json ${meta.id}.tissue.png

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
